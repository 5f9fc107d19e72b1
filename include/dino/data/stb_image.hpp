// dino/data/stb_image.hpp: stb_image (Debian libstb-dev, <stb/stb_image.h>) for a
// header-only library.
//
// The implementation is compiled into every translation unit that includes this header, with
// STB_IMAGE_STATIC so that all its functions have internal linkage: no duplicate symbols
// however many translation units include it, and no clash with a copy the user links. Only
// the decoders dino uses are compiled (PNG, JPEG, BMP, PNM), images wider or taller than
// STBI_MAX_DIMENSIONS (32768 unless defined before) are refused, and decoding is from memory
// (STBI_NO_STDIO). stb_image >= 2.26 keeps its failure reason thread_local, so decoding from
// several threads is safe.
//
// A translation unit that already includes <stb/stb_image.h> itself must either include
// this header first, or define DINO_STB_IMAGE_EXTERNAL: then only the declarations are
// included here and the user's own (non-static) implementation is used.
#pragma once

#if defined(DINO_STB_IMAGE_EXTERNAL)
#include <stb/stb_image.h>
#else
#if defined(STBI_INCLUDE_STB_IMAGE_H)
#error "dino/data/stb_image.hpp: <stb/stb_image.h> was included before; include dino's data headers first or define DINO_STB_IMAGE_EXTERNAL"
#endif
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STBI_ONLY_PNM
#define STBI_NO_STDIO
#ifndef STBI_MAX_DIMENSIONS
#define STBI_MAX_DIMENSIONS 32768
#endif
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#endif
#include <stb/stb_image.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#undef STB_IMAGE_IMPLEMENTATION
#endif
