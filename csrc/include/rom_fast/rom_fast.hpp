// Umbrella header of the rom_fast core (C++17, no Python).
#pragma once

#include "rom_fast/anchor.hpp"
#include "rom_fast/common.hpp"
#include "rom_fast/eigen.hpp"
#include "rom_fast/factorize.hpp"
#include "rom_fast/gram.hpp"
#include "rom_fast/lowrank.hpp"
#include "rom_fast/neurons.hpp"
#include "rom_fast/threads.hpp"
#include "rom_fast/version.hpp"
