#pragma once
// Compiler and platform configuration shared by every fabric header. Torch-free.

#if !defined(__cplusplus) || __cplusplus < 202002L
#if !defined(_MSVC_LANG) || _MSVC_LANG < 202002L
#error "fabric: C++20 is required; compile with -std=c++20 (CMake: target_compile_features(... cxx_std_20))"
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FABRIC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FABRIC_ALWAYS_INLINE inline
#endif

#if defined(_MSC_VER)
#define FABRIC_NO_UNIQUE_ADDRESS [[msvc::no_unique_address]]
#else
#define FABRIC_NO_UNIQUE_ADDRESS [[no_unique_address]]
#endif
