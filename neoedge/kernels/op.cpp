// neoedge.kernels::MatMulNBits: a drop-in for com.microsoft.MatMulNBits (accuracy_level 4) registered
// with onnxruntime as a custom op. Same inputs (A, B, scales, optional zero_points), attributes and
// results; the work runs on the session's intra-op thread pool.
#include <cstdlib>
#include <cstring>
#include <exception>
#include <atomic>
#include <mutex>
#include <string>

#include "ort_abi.h"
#include "qgemm.h"

#if defined(_WIN32)
#define NEO_EXPORT extern "C" __declspec(dllexport)
#else
#define NEO_EXPORT extern "C" __attribute__((visibility("default")))
#endif

namespace {

using namespace ort_abi;
using neoedge::Isa;

constexpr const char* kDomain = "neoedge.kernels";
constexpr const char* kOpName = "MatMulNBits";
constexpr const char* kIsaVariable = "NEOEDGE_KERNELS_ISA";
constexpr const char* kBatchedVariable = "NEOEDGE_KERNELS_BATCHED";

Functions g_ort;  // filled by RegisterCustomOps before any kernel exists

Status* error(ErrorCode code, const std::string& message) {
  return g_ort.CreateStatus(code, ("neoedge.kernels MatMulNBits: " + message).c_str());
}

// The path forced by NEOEDGE_KERNELS_ISA (narrower paths only), or the best one this CPU runs.
bool selected_isa(Isa* isa, std::string* why) {
  const char* forced = std::getenv(kIsaVariable);
  if (!forced || !*forced) {
    *isa = neoedge::best_isa();
    return true;
  }
  if (!neoedge::isa_from_name(forced, isa)) {
    *why = std::string(kIsaVariable) + "=" + forced +
           " is not a kernel path (amx, avx512vnni, avxvnni, avx2, neon, portable)";
    return false;
  }
  if (!neoedge::isa_supported(*isa)) {
    *why = std::string(kIsaVariable) + "=" + forced + " but this CPU cannot run that path (best: " +
           neoedge::isa_name(neoedge::best_isa()) + ")";
    return false;
  }
  return true;
}

struct Kernel {
  int64_t k, n, bits, block;
  Isa isa;
  bool batched;  // read once, when the session creates the kernel
  // B, scales and zero points are initializers: once their sizes are checked, the same data
  // pointers need no second look (a decode step runs ~50 of these ops; each C API call counts).
  std::atomic<const void*> checked[3] = {nullptr, nullptr, nullptr};
};

Status* read_attribute(const KernelInfo* info, const char* name, int64_t* out, bool required) {
  Status* status = g_ort.KernelInfoGetAttribute_int64(info, name, out);
  if (!status) return nullptr;
  g_ort.ReleaseStatus(status);
  if (!required) return nullptr;
  return error(kInvalidArgument, std::string("missing integer attribute '") + name + "'");
}

Status* NEO_ORT_CALL create_kernel(const CustomOp*, const Api*, const KernelInfo* info, void** out) {
  *out = nullptr;
  // MatMulNBits' own default accuracy_level is 0 (fp32 compute): absent means not ours to run.
  int64_t k = 0, n = 0, bits = 0, block = 0, accuracy = 0;
  for (auto [name, value] : {std::pair<const char*, int64_t*>{"K", &k}, {"N", &n}, {"bits", &bits},
                             {"block_size", &block}}) {
    if (Status* s = read_attribute(info, name, value, true)) return s;
  }
  read_attribute(info, "accuracy_level", &accuracy, false);
  if (bits != 4 && bits != 8) return error(kInvalidArgument, "bits must be 4 or 8, got " + std::to_string(bits));
  if (block < 16 || block > 256 || (block & (block - 1)))
    return error(kInvalidArgument, "block_size must be a power of two in 16..256, got " + std::to_string(block));
  if (k <= 0 || n <= 0 || k % block)
    return error(kInvalidArgument, "K (" + std::to_string(k) + ") must be a positive multiple of block_size (" +
                                       std::to_string(block) + ") and N (" + std::to_string(n) + ") positive");
  // Level 4 quantizes A to int8 per block; other levels compute in fp32 and would give other results.
  if (accuracy != 4)
    return error(kInvalidArgument, "only accuracy_level 4 is implemented, got " + std::to_string(accuracy));
  size_t inputs = 0;
  if (Status* s = g_ort.KernelInfo_GetInputCount(info, &inputs)) return s;
  if (inputs > 4) return error(kNotImplemented, "g_idx and bias inputs are not supported");
  Isa isa;
  std::string why;
  if (!selected_isa(&isa, &why)) return error(kInvalidArgument, why);
  const char* batched = std::getenv(kBatchedVariable);
  *out = new Kernel{k, n, bits, block, isa, !(batched && std::strcmp(batched, "0") == 0)};
  return nullptr;
}

// Element count and dimensions of an input tensor.
Status* shape_of(const Value* value, int64_t* dims, size_t* rank, int64_t* count) {
  TensorTypeAndShapeInfo* info = nullptr;
  if (Status* s = g_ort.GetTensorTypeAndShape(value, &info)) return s;
  Status* s = g_ort.GetDimensionsCount(info, rank);
  if (!s && *rank > 8) s = error(kInvalidArgument, "inputs of rank above 8 are not supported");
  if (!s) s = g_ort.GetDimensions(info, dims, *rank);
  g_ort.ReleaseTensorTypeAndShapeInfo(info);
  if (s) return s;
  *count = 1;
  for (size_t i = 0; i < *rank; ++i) *count *= dims[i];
  return nullptr;
}

bool pool_run(const void* context, void (*fn)(void*, size_t), size_t total, void* user) {
  if (total == 1) {
    fn(user, 0);
    return true;
  }
  Status* s = g_ort.KernelContext_ParallelFor(static_cast<const KernelContext*>(context), fn, total, 0, user);
  if (!s) return true;
  g_ort.ReleaseStatus(s);
  return false;
}

Status* compute(Kernel& kernel, KernelContext* context) {
  size_t input_count = 0;
  if (Status* s = g_ort.KernelContext_GetInputCount(context, &input_count)) return s;
  const Value* values[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t i = 0; i < 4 && i < input_count; ++i) {
    if (Status* s = g_ort.KernelContext_GetInput(context, i, &values[i])) return s;
  }
  if (!values[0] || !values[1] || !values[2]) return error(kInvalidArgument, "A, B and scales are required");
  int64_t dims[8], count = 0;
  size_t rank = 0;
  if (Status* s = shape_of(values[0], dims, &rank, &count)) return s;
  if (rank < 1 || dims[rank - 1] != kernel.k)
    return error(kInvalidArgument, "A's last dimension must be K = " + std::to_string(kernel.k));
  void* data[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  for (int i = 0; i < 4; ++i) {
    if (values[i]) {
      if (Status* s = g_ort.GetTensorMutableData(const_cast<Value*>(values[i]), &data[i])) return s;
    }
  }
  const int64_t blocks = kernel.k / kernel.block;
  const int64_t expected[3] = {kernel.n * kernel.k * kernel.bits / 8, kernel.n * blocks,
                               kernel.n * (kernel.bits == 8 ? blocks : (blocks + 1) / 2)};
  static const char* const what[3] = {"B must hold N * K * bits / 8 = ", "scales must hold N * K / block_size = ",
                                      "zero_points must hold "};
  for (int i = 0; i < 3; ++i) {
    if (!values[i + 1] || kernel.checked[i].load(std::memory_order_relaxed) == data[i + 1]) continue;
    int64_t other_dims[8], other_count = 0;
    size_t other_rank = 0;
    if (Status* s = shape_of(values[i + 1], other_dims, &other_rank, &other_count)) return s;
    if (other_count != expected[i])
      return error(kInvalidArgument, what[i] + std::to_string(expected[i]) + " values, has " + std::to_string(other_count));
    kernel.checked[i].store(data[i + 1], std::memory_order_relaxed);
  }
  int64_t out_dims[8];
  for (size_t i = 0; i + 1 < rank; ++i) out_dims[i] = dims[i];
  out_dims[rank - 1] = kernel.n;
  Value* output = nullptr;
  if (Status* s = g_ort.KernelContext_GetOutput(context, 0, out_dims, rank, &output)) return s;
  const int64_t m = count / kernel.k;
  if (m == 0) return nullptr;
  if (Status* s = g_ort.GetTensorMutableData(output, &data[4])) return s;
  neoedge::Problem p{static_cast<const float*>(data[0]), m, kernel.k, kernel.n,
                     static_cast<const uint8_t*>(data[1]), static_cast<const float*>(data[2]),
                     static_cast<const uint8_t*>(data[3]), static_cast<int>(kernel.bits),
                     static_cast<int>(kernel.block), static_cast<float*>(data[4]), kernel.batched};
  neoedge::Parallel parallel{pool_run, context};
  if (!neoedge::run(p, parallel, kernel.isa)) return error(kRuntimeException, "the thread pool failed");
  return nullptr;
}

Status* NEO_ORT_CALL compute_v2(void* kernel, KernelContext* context) {
  try {
    return compute(*static_cast<Kernel*>(kernel), context);
  } catch (const std::exception& e) {  // std::bad_alloc from a scratch buffer
    return error(kRuntimeException, e.what());
  }
}

void NEO_ORT_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* NEO_ORT_CALL op_name(const CustomOp*) { return kOpName; }
const char* NEO_ORT_CALL op_provider(const CustomOp*) { return "CPUExecutionProvider"; }
ElementType NEO_ORT_CALL input_type(const CustomOp*, size_t index) {
  return index == 0 || index == 2 ? kFloat : kUint8;
}
size_t NEO_ORT_CALL input_count(const CustomOp*) { return 4; }
ElementType NEO_ORT_CALL output_type(const CustomOp*, size_t) { return kFloat; }
size_t NEO_ORT_CALL output_count(const CustomOp*) { return 1; }
InputOutputCharacteristic NEO_ORT_CALL input_characteristic(const CustomOp*, size_t index) {
  return index == 3 ? kOptional : kRequired;
}
InputOutputCharacteristic NEO_ORT_CALL output_characteristic(const CustomOp*, size_t) { return kRequired; }
MemType NEO_ORT_CALL input_memory(const CustomOp*, size_t) { return kMemTypeDefault; }
int NEO_ORT_CALL variadic_min_arity(const CustomOp*) { return 1; }
int NEO_ORT_CALL variadic_homogeneity(const CustomOp*) { return 1; }
int NEO_ORT_CALL start_version(const CustomOp*) { return 1; }
int NEO_ORT_CALL end_version(const CustomOp*) { return 1000; }
size_t NEO_ORT_CALL no_pairs(int** inputs, int** outputs) {
  *inputs = nullptr;
  *outputs = nullptr;
  return 0;
}
void NEO_ORT_CALL release_pairs(int*, int*) {}

const CustomOp kOp = {
    kApiVersion,
    nullptr,  // CreateKernel: the V2 callbacks are used
    op_name, op_provider, input_type, input_count, output_type, output_count,
    nullptr,  // KernelCompute
    destroy_kernel, input_characteristic, output_characteristic, input_memory, variadic_min_arity,
    variadic_homogeneity, variadic_min_arity, variadic_homogeneity, create_kernel, compute_v2,
    nullptr,  // InferOutputShapeFn
    start_version, end_version, no_pairs, release_pairs, no_pairs, release_pairs,
};

std::mutex g_mutex;
CustomOpDomain* g_domain = nullptr;  // one domain for every session; lives as long as the process

}  // namespace

NEO_EXPORT Status* NEO_ORT_CALL RegisterCustomOps(SessionOptions* options, const ApiBase* base) {
  const Api* api = base->GetApi(kApiVersion);
  if (!api) return nullptr;  // an onnxruntime older than 1.21: nothing registered, the graph won't load
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_domain) {
    g_ort.load(api);
    CustomOpDomain* domain = nullptr;
    if (Status* s = g_ort.CreateCustomOpDomain(kDomain, &domain)) return s;
    if (Status* s = g_ort.CustomOpDomain_Add(domain, &kOp)) return s;
    g_domain = domain;
  }
  return g_ort.AddCustomOpDomain(options, g_domain);
}

// For the Python side: which paths exist here, without creating a session.
NEO_EXPORT int neoedge_kernels_interface_version() { return 1; }
NEO_EXPORT const char* neoedge_kernels_best_isa() { return neoedge::isa_name(neoedge::best_isa()); }
NEO_EXPORT int neoedge_kernels_isa_supported(const char* name) {
  Isa isa;
  return neoedge::isa_from_name(name, &isa) && neoedge::isa_supported(isa) ? 1 : 0;
}
