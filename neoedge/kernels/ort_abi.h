// The part of onnxruntime's C ABI that neoedge's kernels use, declared here so the library builds on
// machines that have a C++ compiler but no onnxruntime headers (no pip package or Debian 12 package
// ships them). These are facts of the ABI, written from onnxruntime 1.21's C API (ORT_API_VERSION 21,
// as packaged by Debian 13 `libonnxruntime-dev` 1.21.0+dfsg-1): function-table slot indices, the
// custom-op struct layout, enum values. onnxruntime only appends to its OrtApi table and freezes the
// existing slots with static_asserts, and GetApi(21) is served by every later release, so these
// declarations hold for the onnxruntime 1.32 neoedge pins.
//
// Nothing is linked: onnxruntime hands the library its OrtApiBase in RegisterCustomOps.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(_WIN32) && !defined(_WIN64)
#define NEO_ORT_CALL __stdcall
#else
#define NEO_ORT_CALL
#endif

namespace ort_abi {

constexpr uint32_t kApiVersion = 21;

// Opaque handles.
struct Status;
struct SessionOptions;
struct CustomOpDomain;
struct KernelInfo;
struct KernelContext;
struct Value;
struct TensorTypeAndShapeInfo;
struct ShapeInferContext;

enum ErrorCode : int {
  kOk = 0,
  kFail = 1,
  kInvalidArgument = 2,
  kRuntimeException = 6,
  kNotImplemented = 9,
  kInvalidGraph = 10,
};

enum ElementType : int {
  kUndefined = 0,
  kFloat = 1,
  kUint8 = 2,
  kInt8 = 3,
  kInt32 = 6,
  kInt64 = 7,
};

enum MemType : int { kMemTypeDefault = 0 };

enum InputOutputCharacteristic : int { kRequired = 0, kOptional = 1, kVariadic = 2 };

struct Api;  // the function table, read through `Functions` below

struct ApiBase {
  const Api*(NEO_ORT_CALL* GetApi)(uint32_t version);
  const char*(NEO_ORT_CALL* GetVersionString)(void);
};

// Slot index of each OrtApi function used, counted from the start of the table (version 21 layout).
enum Slot : size_t {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomain_Add = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttribute_float = 85,
  kKernelInfoGetAttribute_int64 = 86,
  kKernelContext_GetInputCount = 88,
  kKernelContext_GetOutputCount = 89,
  kKernelContext_GetInput = 90,
  kKernelContext_GetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelInfo_GetInputCount = 230,
  kKernelInfoGetConstantInput_tensor = 249,
  kKernelContext_ParallelFor = 274,
  kSlotCount = 285,  // slots in version 21
};
static_assert(kKernelContext_ParallelFor < kSlotCount, "every slot used exists in version 21");

// Typed pointers to the slots above, read once from the table onnxruntime returns.
struct Functions {
  Status*(NEO_ORT_CALL* CreateStatus)(ErrorCode code, const char* msg);
  Status*(NEO_ORT_CALL* CreateCustomOpDomain)(const char* domain, CustomOpDomain** out);
  Status*(NEO_ORT_CALL* CustomOpDomain_Add)(CustomOpDomain* domain, const struct CustomOp* op);
  Status*(NEO_ORT_CALL* AddCustomOpDomain)(SessionOptions* options, CustomOpDomain* domain);
  Status*(NEO_ORT_CALL* GetTensorMutableData)(Value* value, void** out);
  Status*(NEO_ORT_CALL* GetDimensionsCount)(const TensorTypeAndShapeInfo* info, size_t* out);
  Status*(NEO_ORT_CALL* GetDimensions)(const TensorTypeAndShapeInfo* info, int64_t* dims, size_t count);
  Status*(NEO_ORT_CALL* GetTensorTypeAndShape)(const Value* value, TensorTypeAndShapeInfo** out);
  Status*(NEO_ORT_CALL* KernelInfoGetAttribute_float)(const KernelInfo* info, const char* name, float* out);
  Status*(NEO_ORT_CALL* KernelInfoGetAttribute_int64)(const KernelInfo* info, const char* name, int64_t* out);
  Status*(NEO_ORT_CALL* KernelContext_GetInputCount)(const KernelContext* context, size_t* out);
  Status*(NEO_ORT_CALL* KernelContext_GetOutputCount)(const KernelContext* context, size_t* out);
  Status*(NEO_ORT_CALL* KernelContext_GetInput)(const KernelContext* context, size_t index, const Value** out);
  Status*(NEO_ORT_CALL* KernelContext_GetOutput)(KernelContext* context, size_t index, const int64_t* dims,
                                                 size_t dim_count, Value** out);
  void(NEO_ORT_CALL* ReleaseStatus)(Status* status);
  void(NEO_ORT_CALL* ReleaseTensorTypeAndShapeInfo)(TensorTypeAndShapeInfo* info);
  Status*(NEO_ORT_CALL* KernelInfo_GetInputCount)(const KernelInfo* info, size_t* out);
  // The input's value if it is a constant initializer (is_constant 1; owned by the session), else
  // is_constant 0 and out null.
  Status*(NEO_ORT_CALL* KernelInfoGetConstantInput_tensor)(const KernelInfo* info, size_t index, int* is_constant,
                                                           const Value** out);
  // Runs fn(user, i) for i in [0, total) on the session's intra-op thread pool; num_batch 0 lets the
  // pool hand out indices one at a time (dynamic balance).
  Status*(NEO_ORT_CALL* KernelContext_ParallelFor)(const KernelContext* context, void (*fn)(void*, size_t),
                                                   size_t total, size_t num_batch, void* user);

  // Reads the slots from the table GetApi(kApiVersion) returned.
  void load(const Api* api) {
    const void* const* table = reinterpret_cast<const void* const*>(api);
    auto at = [table](Slot slot) { return table[slot]; };
    assign(CreateStatus, at(kCreateStatus));
    assign(CreateCustomOpDomain, at(kCreateCustomOpDomain));
    assign(CustomOpDomain_Add, at(kCustomOpDomain_Add));
    assign(AddCustomOpDomain, at(kAddCustomOpDomain));
    assign(GetTensorMutableData, at(kGetTensorMutableData));
    assign(GetDimensionsCount, at(kGetDimensionsCount));
    assign(GetDimensions, at(kGetDimensions));
    assign(GetTensorTypeAndShape, at(kGetTensorTypeAndShape));
    assign(KernelInfoGetAttribute_float, at(kKernelInfoGetAttribute_float));
    assign(KernelInfoGetAttribute_int64, at(kKernelInfoGetAttribute_int64));
    assign(KernelContext_GetInputCount, at(kKernelContext_GetInputCount));
    assign(KernelContext_GetOutputCount, at(kKernelContext_GetOutputCount));
    assign(KernelContext_GetInput, at(kKernelContext_GetInput));
    assign(KernelContext_GetOutput, at(kKernelContext_GetOutput));
    assign(ReleaseStatus, at(kReleaseStatus));
    assign(ReleaseTensorTypeAndShapeInfo, at(kReleaseTensorTypeAndShapeInfo));
    assign(KernelInfo_GetInputCount, at(kKernelInfo_GetInputCount));
    assign(KernelInfoGetConstantInput_tensor, at(kKernelInfoGetConstantInput_tensor));
    assign(KernelContext_ParallelFor, at(kKernelContext_ParallelFor));
  }

 private:
  template <typename F>
  static void assign(F& field, const void* pointer) {
    field = reinterpret_cast<F>(const_cast<void*>(pointer));
  }
};

// OrtCustomOp, version-21 layout: a version field followed by callbacks in this order. onnxruntime
// reads the fields a version introduced only when `version` is at least that version; null is
// accepted for CreateKernelV2/KernelComputeV2 (then the V1 pair is used), InferOutputShapeFn and
// GetStartVersion/GetEndVersion.
struct CustomOp {
  uint32_t version;
  void*(NEO_ORT_CALL* CreateKernel)(const CustomOp* op, const Api* api, const KernelInfo* info);
  const char*(NEO_ORT_CALL* GetName)(const CustomOp* op);
  const char*(NEO_ORT_CALL* GetExecutionProviderType)(const CustomOp* op);
  ElementType(NEO_ORT_CALL* GetInputType)(const CustomOp* op, size_t index);
  size_t(NEO_ORT_CALL* GetInputTypeCount)(const CustomOp* op);
  ElementType(NEO_ORT_CALL* GetOutputType)(const CustomOp* op, size_t index);
  size_t(NEO_ORT_CALL* GetOutputTypeCount)(const CustomOp* op);
  void(NEO_ORT_CALL* KernelCompute)(void* kernel, KernelContext* context);
  void(NEO_ORT_CALL* KernelDestroy)(void* kernel);
  InputOutputCharacteristic(NEO_ORT_CALL* GetInputCharacteristic)(const CustomOp* op, size_t index);
  InputOutputCharacteristic(NEO_ORT_CALL* GetOutputCharacteristic)(const CustomOp* op, size_t index);
  MemType(NEO_ORT_CALL* GetInputMemoryType)(const CustomOp* op, size_t index);
  int(NEO_ORT_CALL* GetVariadicInputMinArity)(const CustomOp* op);
  int(NEO_ORT_CALL* GetVariadicInputHomogeneity)(const CustomOp* op);
  int(NEO_ORT_CALL* GetVariadicOutputMinArity)(const CustomOp* op);
  int(NEO_ORT_CALL* GetVariadicOutputHomogeneity)(const CustomOp* op);
  Status*(NEO_ORT_CALL* CreateKernelV2)(const CustomOp* op, const Api* api, const KernelInfo* info, void** kernel);
  Status*(NEO_ORT_CALL* KernelComputeV2)(void* kernel, KernelContext* context);
  Status*(NEO_ORT_CALL* InferOutputShapeFn)(const CustomOp* op, ShapeInferContext* context);
  int(NEO_ORT_CALL* GetStartVersion)(const CustomOp* op);
  int(NEO_ORT_CALL* GetEndVersion)(const CustomOp* op);
  size_t(NEO_ORT_CALL* GetMayInplace)(int** input_index, int** output_index);
  void(NEO_ORT_CALL* ReleaseMayInplace)(int* input_index, int* output_index);
  size_t(NEO_ORT_CALL* GetAliasMap)(int** input_index, int** output_index);
  void(NEO_ORT_CALL* ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // namespace ort_abi
