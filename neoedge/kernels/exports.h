// The library's C entry points: onnxruntime's RegisterCustomOps and the functions neoedge calls
// through ctypes (the library is built with hidden visibility).
#pragma once

#if defined(_WIN32)
#define NEO_EXPORT extern "C" __declspec(dllexport)
#else
#define NEO_EXPORT extern "C" __attribute__((visibility("default")))
#endif
