// hold-mlx's native MLX CPU primitives, loaded by hold_mlx/native.py (which builds this file).
//
// conv3x3 and its weight gradient (conv3x3.h), group_norm and its gradient (group_norm.h) are MLX Primitives whose
// eval_cpu runs the kernel on the stream's own thread, so they compose with mx.compile, lazy evaluation and the
// per-core streams like any MLX op. Gradients are wired in Python (hold_mlx/fastops.py)
// through mx.custom_function; the primitives themselves have no VJP.
//
// Compiled once per instruction set: HOLD_MODULE names the module (one per variant, so several
// can be loaded in one process) and HOLD_ISA says which variant this is.
#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <typeinfo>
#include <tuple>

#include "conv3x3.h"
#include "cpu_cache.h"
#include "group_norm.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

#ifndef HOLD_MODULE
#define HOLD_MODULE _hold_native
#endif
#ifndef HOLD_ISA
#define HOLD_ISA "unnamed"
#endif

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// Allocates the outputs and runs kernel(inputs, outputs) on the stream's thread, after the work
// queued before it, as MLX's own CPU primitives do.
template <class Kernel>
void run_on_stream_multi(const mx::Stream& stream, const std::vector<mx::array>& inputs, std::vector<mx::array>& outs,
                         Kernel kernel) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  std::vector<mx::array> held, held_out;
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
    held.push_back(mx::array::unsafe_weak_copy(a));
  }
  for (auto& out : outs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
    held_out.push_back(mx::array::unsafe_weak_copy(out));
  }
  encoder.dispatch([held = std::move(held), held_out = std::move(held_out), kernel]() mutable {
    kernel(held, held_out);
  });
}

// The same for one output: kernel(inputs, out).
template <class Kernel>
void run_on_stream(const mx::Stream& stream, const std::vector<mx::array>& inputs, mx::array& out, Kernel kernel) {
  std::vector<mx::array> outs{out};
  run_on_stream_multi(stream, inputs, outs, [kernel](std::vector<mx::array>& in, std::vector<mx::array>& o) mutable {
    kernel(in, o[0]);
  });
}

// A forward-only CPU primitive; its name is also its error message's subject.
class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only");
  }
};

// A CPU primitive without settings: Body::run(inputs, output) on the stream; Body::name names it.
template <class Body>
class StatelessPrimitive : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    run_on_stream(stream(), inputs, outputs[0], Body::run);
  }

  const char* name() const override { return Body::name; }
  bool is_equivalent(const mx::Primitive& other) const override { return typeid(*this) == typeid(other); }
};

struct Conv3x3Body {
  static constexpr const char* name = "HoldConv3x3";
  static void run(std::vector<mx::array>& in, mx::array& out) {
    const auto& x = in[0];
    hold_native::conv3x3(x.data<float>(), in[1].data<float>(), in[2].data<float>(), out.data<float>(), x.shape(0),
                         x.shape(1), x.shape(2), x.shape(3), in[1].shape(0));
  }
};
using Conv3x3 = StatelessPrimitive<Conv3x3Body>;

struct Conv3x3Stride2Body {
  static constexpr const char* name = "HoldConv3x3Stride2";
  static void run(std::vector<mx::array>& in, mx::array& out) {
    const auto& x = in[0];
    hold_native::conv3x3(x.data<float>(), in[1].data<float>(), in[2].data<float>(), out.data<float>(), x.shape(0),
                         x.shape(1), x.shape(2), x.shape(3), in[1].shape(0), 2);
  }
};
using Conv3x3Stride2 = StatelessPrimitive<Conv3x3Stride2Body>;

struct UpsampleConv3x3Body {
  static constexpr const char* name = "HoldUpsampleConv3x3";
  static void run(std::vector<mx::array>& in, mx::array& out) {
    const auto& x = in[0];
    hold_native::upsample_conv3x3(x.data<float>(), in[1].data<float>(), in[2].data<float>(), out.data<float>(),
                                  x.shape(0), x.shape(1), x.shape(2), x.shape(3), in[1].shape(0));
  }
};
using UpsampleConv3x3 = StatelessPrimitive<UpsampleConv3x3Body>;

struct Conv3x3WeightGradBody {
  static constexpr const char* name = "HoldConv3x3WeightGrad";
  static void run(std::vector<mx::array>& in, mx::array& out) {
    const auto& x = in[0];
    hold_native::conv3x3_weight_grad(x.data<float>(), in[1].data<float>(), out.data<float>(), x.shape(0),
                                     x.shape(1), x.shape(2), x.shape(3), in[1].shape(3));
  }
};
using Conv3x3WeightGrad = StatelessPrimitive<Conv3x3WeightGradBody>;

// GroupNorm's forward and backward primitives share their settings and what makes two equal.
class GroupNormPrimitive : public CpuPrimitive {
 public:
  GroupNormPrimitive(mx::Stream stream, int groups, float eps, bool act)
      : CpuPrimitive(stream), groups_(groups), eps_(eps), act_(act) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* o = dynamic_cast<const GroupNormPrimitive*>(&other);
    return o && typeid(*this) == typeid(other) && groups_ == o->groups_ && eps_ == o->eps_ && act_ == o->act_;
  }

 protected:
  int groups_;
  float eps_;
  bool act_;
};

class GroupNorm : public GroupNormPrimitive {
 public:
  using GroupNormPrimitive::GroupNormPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    run_on_stream(stream(), inputs, outputs[0],
                  [groups = groups_, eps = eps_, act = act_](std::vector<mx::array>& in, mx::array& out) {
                    const auto& x = in[0];
                    if (x.size() == 0) return;  // an empty batch: nothing to normalise
                    const int channels = x.shape(-1), batch = x.shape(0);
                    const int pixels = int(x.size() / (std::size_t(batch) * channels));
                    hold_native::group_norm(x.data<float>(), in[1].data<float>(), in[2].data<float>(),
                                            out.data<float>(), batch, pixels, channels, groups, eps, act);
                  });
  }

  const char* name() const override { return "HoldGroupNorm"; }
};

class GroupNormBackward : public GroupNormPrimitive {
 public:
  using GroupNormPrimitive::GroupNormPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    run_on_stream_multi(stream(), inputs, outputs,
                        [groups = groups_, eps = eps_, act = act_](std::vector<mx::array>& in,
                                                                   std::vector<mx::array>& out) {
                          const auto& x = in[0];
                          const int channels = x.shape(-1), batch = x.shape(0);
                          if (x.size() == 0) {  // an empty batch: zero parameter gradients
                            std::fill_n(out[1].data<float>(), channels, 0.f);
                            std::fill_n(out[2].data<float>(), channels, 0.f);
                            return;
                          }
                          const int pixels = int(x.size() / (std::size_t(batch) * channels));
                          hold_native::group_norm_backward(x.data<float>(), in[1].data<float>(),
                                                           in[2].data<float>(), in[3].data<float>(),
                                                           out[0].data<float>(), out[1].data<float>(),
                                                           out[2].data<float>(), batch, pixels, channels, groups,
                                                           eps, act);
                        });
  }

  const char* name() const override { return "HoldGroupNormBackward"; }
};

std::string shape_str(const mx::array& a) {
  std::string s = "(";
  for (int i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + ")";
}

mx::array conv3x3(const mx::array& x, const mx::array& weight, const mx::array& bias, int stride,
                  mx::StreamOrDevice s) {
  if (x.ndim() != 4 || weight.ndim() != 4 || bias.ndim() != 1 || weight.shape(1) != 3 || weight.shape(2) != 3 ||
      weight.shape(3) != x.shape(3) || bias.shape(0) != weight.shape(0))
    throw std::invalid_argument("conv3x3: expected x (B, H, W, C), weight (O, 3, 3, C), bias (O,); got " +
                                shape_str(x) + ", " + shape_str(weight) + ", " + shape_str(bias));
  if (stride != 1 && stride != 2) throw std::invalid_argument("conv3x3: stride must be 1 or 2");
  if (stride == 2 && (x.shape(1) % 2 || x.shape(2) % 2))
    throw std::invalid_argument("conv3x3: stride 2 needs an even height and width; got " + shape_str(x));
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || bias.dtype() != mx::float32)
    throw std::invalid_argument("conv3x3: float32 arrays only");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("conv3x3: needs a CPU stream");
  std::shared_ptr<mx::Primitive> primitive;
  if (stride == 2)
    primitive = std::make_shared<Conv3x3Stride2>(stream);
  else
    primitive = std::make_shared<Conv3x3>(stream);
  return mx::array({x.shape(0), x.shape(1) / stride, x.shape(2) / stride, weight.shape(0)}, mx::float32,
                   std::move(primitive),
                   {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream),
                    mx::contiguous(bias, false, stream)});
}

mx::array upsample_conv3x3(const mx::array& x, const mx::array& weight, const mx::array& bias,
                           mx::StreamOrDevice s) {
  if (x.ndim() != 4 || weight.ndim() != 4 || bias.ndim() != 1 || weight.shape(1) != 3 || weight.shape(2) != 3 ||
      weight.shape(3) != x.shape(3) || bias.shape(0) != weight.shape(0))
    throw std::invalid_argument("upsample_conv3x3: expected x (B, H, W, C), weight (O, 3, 3, C), bias (O,); got " +
                                shape_str(x) + ", " + shape_str(weight) + ", " + shape_str(bias));
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || bias.dtype() != mx::float32)
    throw std::invalid_argument("upsample_conv3x3: float32 arrays only");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("upsample_conv3x3: needs a CPU stream");
  return mx::array({x.shape(0), 2 * x.shape(1), 2 * x.shape(2), weight.shape(0)}, mx::float32,
                   std::make_shared<UpsampleConv3x3>(stream),
                   {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream),
                    mx::contiguous(bias, false, stream)});
}

mx::array conv3x3_weight_grad(const mx::array& x, const mx::array& grad, mx::StreamOrDevice s) {
  if (x.ndim() != 4 || grad.ndim() != 4 || grad.shape(0) != x.shape(0) || grad.shape(1) != x.shape(1) ||
      grad.shape(2) != x.shape(2))
    throw std::invalid_argument("conv3x3_weight_grad: expected x (B, H, W, C) and grad (B, H, W, O); got " +
                                shape_str(x) + ", " + shape_str(grad));
  if (grad.shape(3) % hold_native::kLanes != 0)
    throw std::invalid_argument("conv3x3_weight_grad: output channels must be a multiple of " +
                                std::to_string(hold_native::kLanes) + "; got " + std::to_string(grad.shape(3)));
  if (x.dtype() != mx::float32 || grad.dtype() != mx::float32)
    throw std::invalid_argument("conv3x3_weight_grad: float32 arrays only");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("conv3x3_weight_grad: needs a CPU stream");
  return mx::array({grad.shape(3), 3, 3, x.shape(3)}, mx::float32, std::make_shared<Conv3x3WeightGrad>(stream),
                   {mx::contiguous(x, false, stream), mx::contiguous(grad, false, stream)});
}

// group_norm's argument checks (also group_norm_backward's); returns the CPU stream.
mx::Stream check_group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups,
                            mx::StreamOrDevice s) {
  if (x.ndim() < 2 || weight.ndim() != 1 || bias.ndim() != 1 || weight.shape(0) != x.shape(-1) ||
      bias.shape(0) != x.shape(-1))
    throw std::invalid_argument("group_norm: expected x (B, ..., C), weight (C,), bias (C,); got " + shape_str(x) +
                                ", " + shape_str(weight) + ", " + shape_str(bias));
  if (groups < 1 || x.shape(-1) % groups != 0)
    throw std::invalid_argument("group_norm: " + std::to_string(x.shape(-1)) + " channels do not split into " +
                                std::to_string(groups) + " groups");
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || bias.dtype() != mx::float32)
    throw std::invalid_argument("group_norm: float32 arrays only");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("group_norm: needs a CPU stream");
  return stream;
}

mx::array group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                     bool act, mx::StreamOrDevice s) {
  auto stream = check_group_norm(x, weight, bias, groups, s);
  return mx::array(x.shape(), mx::float32, std::make_shared<GroupNorm>(stream, groups, eps, act),
                   {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream),
                    mx::contiguous(bias, false, stream)});
}

std::vector<mx::array> group_norm_backward(const mx::array& x, const mx::array& weight, const mx::array& bias,
                                           const mx::array& grad, int groups, float eps, bool act,
                                           mx::StreamOrDevice s) {
  if (grad.shape() != x.shape())
    throw std::invalid_argument("group_norm_backward: grad " + shape_str(grad) + " must have x's shape " +
                                shape_str(x));
  if (grad.dtype() != mx::float32) throw std::invalid_argument("group_norm_backward: float32 arrays only");
  auto stream = check_group_norm(x, weight, bias, groups, s);
  const mx::Shape channels{x.shape(-1)};
  return mx::array::make_arrays({x.shape(), channels, channels}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<GroupNormBackward>(stream, groups, eps, act),
                                {mx::contiguous(x, false, stream), mx::contiguous(weight, false, stream),
                                 mx::contiguous(bias, false, stream), mx::contiguous(grad, false, stream)});
}

}  // namespace

NB_MODULE(HOLD_MODULE, m) {
  m.doc() = "hold-mlx native MLX CPU primitives";
  m.attr("isa") = HOLD_ISA;
  m.attr("vector_lanes") = hold_native::kLanes;
  m.def("cache_sizes", [] {
    const auto sizes = hold_native::cache_sizes();
    return std::make_tuple(sizes.l1d, sizes.l2);
  }, "(L1 data, L2) cache bytes the kernels block for, as the machine reports them.");
  m.def("conv3x3", &conv3x3, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::kw_only(),
        nb::arg("stride") = 1, nb::arg("stream") = nb::none(),
        "3x3 convolution, stride 1 or 2 (even sizes), zero padding 1: x (B, H, W, C), weight (O, 3, 3, C), "
        "bias (O,) -> (B, H / stride, W / stride, O).");
  m.def("upsample_conv3x3", &upsample_conv3x3, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::kw_only(),
        nb::arg("stream") = nb::none(),
        "conv3x3 (stride 1, padding 1) of the nearest 2x upsampling of x (B, H, W, C) -> (B, 2H, 2W, O).");
  m.def("conv3x3_weight_grad", &conv3x3_weight_grad, nb::arg("x"), nb::arg("grad"), nb::kw_only(),
        nb::arg("stream") = nb::none(),
        "Gradient of conv3x3's weight: x (B, H, W, C), grad (B, H, W, O) -> (O, 3, 3, C).");
  m.def("group_norm", &group_norm, nb::arg("x"), nb::arg("weight"), nb::arg("bias"), nb::arg("groups"),
        nb::arg("eps"), nb::arg("act") = false, nb::kw_only(), nb::arg("stream") = nb::none(),
        "torch's GroupNorm over channels-last x (B, ..., C), then SiLU if act.");
  m.def("group_norm_backward", &group_norm_backward, nb::arg("x"), nb::arg("weight"), nb::arg("bias"),
        nb::arg("grad"), nb::arg("groups"), nb::arg("eps"), nb::arg("act") = false, nb::kw_only(),
        nb::arg("stream") = nb::none(),
        "Gradient of group_norm: (dx, dweight, dbias) for the output gradient grad (x's shape).");
}
