// dispatch.h — choose the kernel table for this CPU once, with an override for tests and users.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace kbit {

enum class CpuLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi = 3 };

// Levels this CPU and OS can run, lowest first (scalar always).
std::vector<CpuLevel> supported_levels();
// The level used unless KBIT_CPU_CAPABILITY or set_active_level() says otherwise: the highest supported,
// except that avx512vbmi is preferred only on AMD CPUs (Note [gather-free lookups] in byte_planes.h: it
// trades gathers, slow on Zen 4, for byte permutes, which Intel cores run on a single port).
CpuLevel default_level();
const char* level_name(CpuLevel level);
// Parses "scalar" / "avx2" / "avx512" / "avx512vbmi"; throws std::invalid_argument naming the valid choices.
CpuLevel parse_level(const std::string& name);

// The table in use. Initially the best supported level, or KBIT_CPU_CAPABILITY if that is set (it may
// only lower the level; asking for an unsupported one is an error at import, not a SIGILL later).
const KernelTable& active_kernels();
CpuLevel active_level();
// Throws std::invalid_argument if `level` is not supported here.
void set_active_level(CpuLevel level);

}  // namespace kbit
