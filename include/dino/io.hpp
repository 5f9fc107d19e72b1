// dino/io.hpp: files: safetensors checkpoints with the official names, .npy arrays, atomic
// writes (POSIX). Kept out of dino/dino.hpp so that the core library needs no POSIX headers.
#pragma once

#include "dino/io/atomic_file.hpp"
#include "dino/io/checkpoint.hpp"
#include "dino/io/npy.hpp"
#include "dino/io/safetensors.hpp"
