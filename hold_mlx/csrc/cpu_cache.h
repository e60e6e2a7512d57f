// The data-cache sizes this machine reports, for the kernels' blocking: glibc's sysconf (from
// CPUID on x86), else Linux's /sys/devices/system/cpu/cpu0/cache (ARM64, where sysconf says 0),
// else a conservative default.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <fstream>
#include <string>

namespace hold_native {

// Bytes of the level-`level` data (or unified) cache of CPU 0, 0 if unknown.
inline std::size_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int l = 0;
    std::string type, size;
    if (!(level_file >> l) || !(type_file >> type) || !(size_file >> size)) continue;
    if (l != level || type == "Instruction" || size.empty()) continue;
    std::size_t value = std::stoul(size), unit = 1;
    if (size.back() == 'K') unit = 1024;
    if (size.back() == 'M') unit = 1024 * 1024;
    return value * unit;
  }
  return 0;
}

struct CacheSizes {
  std::size_t l1d, l2;
};

inline CacheSizes cache_sizes() {
  static const CacheSizes sizes = [] {
    long l1 = 0, l2 = 0;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    CacheSizes s{l1 > 0 ? std::size_t(l1) : sysfs_cache_bytes(1), l2 > 0 ? std::size_t(l2) : sysfs_cache_bytes(2)};
    if (s.l1d == 0) s.l1d = 32 * 1024;   // every CPU these kernels target has at least this
    if (s.l2 == 0) s.l2 = 512 * 1024;
    return s;
  }();
  return sizes;
}

}  // namespace hold_native
