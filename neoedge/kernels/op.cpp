// The custom ops registered with onnxruntime, in the neoedge.kernels domain; the work of both runs on
// the session's intra-op thread pool.
// - MatMulNBits: a drop-in for com.microsoft.MatMulNBits (accuracy_level 4): same inputs (A, B,
//   scales, optional zero_points), attributes and results; with rearrange_weights = 1 (the kernel
//   graph's promise that only neoedge kernels read B and scales, and its permission to write them:
//   weights a caller supplies with add_initializer are rewritten too) the AVX-512 VNNI path tiles
//   them in place, each tile by the first call that reads it (tiled.h, tiled_registry.h).
// - GatherBlockQuantized: com.microsoft's over a MatMulNBits table (the tied embedding), reading it
//   in either layout.
// - Attention: com.microsoft.GroupQueryAttention over an int8 per-channel cache, as neoedge's graphs
//   use it, with only the inputs that use needs (attention.h).
// - SkipLayerNormalization and FastGelu: com.microsoft's, without the mean and inverse-deviation
//   outputs of SkipLayerNormalization (elementwise.h).
#include <cstdlib>
#include <cstring>
#include <exception>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ort_abi.h"
#include "attention.h"
#include "elementwise.h"
#include "qgemm.h"
#include "tiled.h"
#include "tiled_registry.h"

#include "exports.h"

namespace {

using namespace ort_abi;
using neoedge::Isa;

constexpr const char* kDomain = "neoedge.kernels";
constexpr const char* kOpName = "MatMulNBits";
constexpr const char* kTiledOpName = "MatMulNBitsTiled";  // MatMulNBits over weights stored tiled
constexpr const char* kIsaVariable = "NEOEDGE_KERNELS_ISA";
constexpr const char* kBatchedVariable = "NEOEDGE_KERNELS_BATCHED";
constexpr const char* kStreamRowsVariable = "NEOEDGE_KERNELS_STREAM_ROWS";
constexpr const char* kTiledVariable = "NEOEDGE_KERNELS_TILED";

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
  bool stream_rows;  // likewise
  // B and scales registered for the tiled layout (tiled_registry.h): read tiled unless pinned.
  std::shared_ptr<neoedge::TiledShared> tiled;
  std::vector<const void*> registered;  // constant inputs registered with tiled_registry, to release
  // B, scales and zero points are initializers: once their sizes are checked, the same data
  // pointers need no second look (a decode step runs ~50 of these ops; each C API call counts).
  std::atomic<const void*> checked[3] = {nullptr, nullptr, nullptr};
};

bool tiling_enabled() {
#if defined(_WIN32)
  // onnxruntime maps external weights read-only on Windows (PAGE_READONLY): no writing in place.
  return false;
#else
  const char* v = std::getenv(kTiledVariable);
  return !(v && std::strcmp(v, "0") == 0);
#endif
}

// The data of input `index` if it is a constant initializer, else null.
Status* constant_input(const KernelInfo* info, size_t index, const Value** value, void** data) {
  int constant = 0;
  *value = nullptr;
  *data = nullptr;
  if (Status* s = g_ort.KernelInfoGetConstantInput_tensor(info, index, &constant, value)) return s;
  if (!constant || !*value) {
    *value = nullptr;
    return nullptr;
  }
  return g_ort.GetTensorMutableData(const_cast<Value*>(*value), data);
}

Status* element_count(const Value* value, int64_t* count);

Status* read_attribute(const KernelInfo* info, const char* name, int64_t* out, bool required) {
  Status* status = g_ort.KernelInfoGetAttribute_int64(info, name, out);
  if (!status) return nullptr;
  g_ort.ReleaseStatus(status);
  if (!required) return nullptr;
  return error(kInvalidArgument, std::string("missing integer attribute '") + name + "'");
}

// Registers the kernel's constant inputs with tiled_registry: B and scales for the tiled layout if
// this kernel's path reads it (the AVX-512 VNNI path, symmetric weights of the expected sizes, the
// graph's rearrange_weights), otherwise every constant input as read in MatMulNBits' layout.
// `stored`: the op is MatMulNBitsTiled, whose B and scales the export stored tiled already (the
// package's tiled kernel graph). A name of its own, not an attribute value, so that a library from
// before it refuses the graph instead of rearranging the weights a second time.
Status* register_weights(const KernelInfo* info, size_t inputs, bool stored, Kernel& kernel) {
  const Value* values[4] = {};
  void* data[4] = {};
  for (size_t i = 1; i < inputs && i < 4; ++i) {
    if (Status* s = constant_input(info, i, &values[i], &data[i])) return s;
  }
  int64_t allowed = 0;
  read_attribute(info, "rearrange_weights", &allowed, false);
  if (allowed != 0 && allowed != 1)
    return error(kInvalidArgument, "rearrange_weights must be 0 or 1, got " + std::to_string(allowed));
  bool tiles = (allowed || stored) && kernel.isa == Isa::avx512vnni && inputs <= 3 && tiling_enabled() && data[1] &&
               data[2];
  const int64_t blocks = kernel.k / kernel.block;
  const int64_t expected[2] = {kernel.n * kernel.k * kernel.bits / 8, kernel.n * blocks};
  for (int i = 0; tiles && i < 2; ++i) {
    int64_t count = 0;
    if (Status* s = element_count(values[i + 1], &count)) return s;
    tiles = count == expected[i];
  }
  if (stored && !tiles) {
    std::string cause = kernel.isa != Isa::avx512vnni
                            ? std::string("this kernel runs the ") + neoedge::isa_name(kernel.isa) + " path"
                        : !tiling_enabled() ? std::string("tiling is off (") + kTiledVariable + "=0, or Windows)"
                        : inputs > 3        ? std::string("the node has zero points")
                        : !(data[1] && data[2]) ? std::string("B or scales is not a constant initializer")
                                                : std::string("B or scales does not hold N x K at this node's bits");
    return error(kInvalidArgument, std::string(kTiledOpName) + ": B and scales are stored in the tiled layout, which "
                                   "only the AVX-512 VNNI path with tiling on reads: " + cause);
  }
  std::string why;
  if (tiles) {
    if (!neoedge::join_tiled(static_cast<uint8_t*>(data[1]), static_cast<float*>(data[2]), kernel.n, kernel.k,
                             kernel.bits, kernel.block, stored, &kernel.tiled, &why))
      return error(kInvalidArgument, why);
    kernel.registered = {data[1], data[2]};
    return nullptr;
  }
  for (size_t i = 1; i < 4; ++i) {
    if (!data[i]) continue;
    if (!neoedge::pin_plain(data[i], &why)) return error(kInvalidArgument, why);
    kernel.registered.push_back(data[i]);
  }
  return nullptr;
}

void release_registrations(const std::vector<const void*>& registered) {
  for (const void* pointer : registered) neoedge::release_registration(pointer);
}

Status* NEO_ORT_CALL create_kernel(const CustomOp* op, const Api*, const KernelInfo* info, void** out) {
  *out = nullptr;
  const bool stored = std::strcmp(op->GetName(op), kTiledOpName) == 0;
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
  const char* stream = std::getenv(kStreamRowsVariable);
  const bool stream_rows = stream && *stream ? std::strcmp(stream, "0") != 0 : neoedge::prefers_row_streaming();
  Kernel* kernel = new Kernel{k, n, bits, block, isa, !(batched && std::strcmp(batched, "0") == 0), stream_rows};
  try {
    if (Status* s = register_weights(info, inputs, stored, *kernel)) {
      release_registrations(kernel->registered);
      delete kernel;
      return s;
    }
  } catch (const std::exception& e) {
    release_registrations(kernel->registered);
    delete kernel;
    return error(kRuntimeException, e.what());
  }
  *out = kernel;
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

Status* element_count(const Value* value, int64_t* count) {
  int64_t dims[8];
  size_t rank = 0;
  return shape_of(value, dims, &rank, count);
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
  // Pinned when another reader of the same weights (created later in this session) reads the old
  // layout: then nothing was rearranged, and this reads it as it is too.
  const neoedge::TiledWeights* tiled =
      kernel.tiled && !kernel.tiled->pinned.load(std::memory_order_relaxed) ? &kernel.tiled->weights : nullptr;
  // ORT hands the kernel the initializers it showed at creation; anything else was not registered.
  if (tiled && (data[1] != tiled->b || data[2] != tiled->scales))
    return error(kRuntimeException, "B or scales is not the initializer registered when the session was created");
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
                     static_cast<int>(kernel.block), static_cast<float*>(data[4]), kernel.batched,
                     kernel.stream_rows, tiled};
  neoedge::Parallel parallel{pool_run, context};
  if (!neoedge::run(p, parallel, kernel.isa)) return error(kRuntimeException, "the thread pool failed");
  return nullptr;
}

// KernelComputeV2 of an op: its compute, with a C++ exception (std::bad_alloc from a scratch
// buffer) returned as the op's error status instead of crossing the C ABI.
template <typename K, Status* (*Compute)(K&, KernelContext*), Status* (*Fail)(ErrorCode, const std::string&)>
Status* NEO_ORT_CALL guarded(void* kernel, KernelContext* context) {
  try {
    return Compute(*static_cast<K*>(kernel), context);
  } catch (const std::exception& e) {
    return Fail(kRuntimeException, e.what());
  }
}

void NEO_ORT_CALL destroy_kernel(void* kernel) {
  release_registrations(static_cast<Kernel*>(kernel)->registered);
  delete static_cast<Kernel*>(kernel);
}

const char* NEO_ORT_CALL op_name(const CustomOp*) { return kOpName; }
const char* NEO_ORT_CALL tiled_op_name(const CustomOp*) { return kTiledOpName; }
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

// An op's table: what differs between the ops is passed in (name, input and output types and
// counts, which ones are optional, the kernel's creation, compute and destruction); the rest is
// the same for all: the CPU provider, default memory, no variadics, no in-place or alias pairs,
// the V2 callbacks (so CreateKernel and KernelCompute are null) and no shape inference.
constexpr CustomOp make_op(decltype(CustomOp::GetName) name, decltype(CustomOp::GetInputType) input_type,
                           decltype(CustomOp::GetInputTypeCount) input_count,
                           decltype(CustomOp::GetOutputType) output_type,
                           decltype(CustomOp::GetOutputTypeCount) output_count,
                           decltype(CustomOp::GetInputCharacteristic) input_kind,
                           decltype(CustomOp::GetOutputCharacteristic) output_kind,
                           decltype(CustomOp::CreateKernelV2) create, decltype(CustomOp::KernelComputeV2) compute,
                           decltype(CustomOp::KernelDestroy) destroy) {
  return CustomOp{kApiVersion, nullptr, name, op_provider, input_type, input_count, output_type, output_count,
                  nullptr, destroy, input_kind, output_kind, input_memory, variadic_min_arity, variadic_homogeneity,
                  variadic_min_arity, variadic_homogeneity, create, compute, nullptr, start_version, end_version,
                  no_pairs, release_pairs, no_pairs, release_pairs};
}

const CustomOp kOp = make_op(op_name, input_type, input_count, output_type, output_count, input_characteristic,
                               output_characteristic, create_kernel, guarded<Kernel, compute, error>, destroy_kernel);
const CustomOp kTiledOp = make_op(tiled_op_name, input_type, input_count, output_type, output_count,
                                  input_characteristic, output_characteristic, create_kernel,
                                  guarded<Kernel, compute, error>, destroy_kernel);

// ---------------------------------------------------------------------------------------------
// Attention: inputs qkv [B, S, 3 H D] float, past_key and past_value [B, H, C, D] int8, seqlens_k
// [B] int32, total_sequence_length int32 scalar, k_scale and v_scale [H, 1, D] float; outputs the
// attention [B, S, H D] and the present caches (bound to the past's memory: updated in place).

constexpr const char* kAttentionName = "Attention";

struct AttentionKernel {
  int64_t heads, window;
  Isa isa;
  // The scales are initializers: once their size is checked, the same pointers need no second look
  // (each C API call counts on a decode step, as for MatMulNBits).
  std::atomic<const void*> checked[2] = {nullptr, nullptr};
};

Status* attention_error(ErrorCode code, const std::string& message) {
  return g_ort.CreateStatus(code, ("neoedge.kernels Attention: " + message).c_str());
}

Status* NEO_ORT_CALL create_attention(const CustomOp*, const Api*, const KernelInfo* info, void** out) {
  *out = nullptr;
  int64_t heads = 0, window = -1;
  if (Status* s = read_attribute(info, "num_heads", &heads, true)) return s;
  read_attribute(info, "local_window_size", &window, false);
  if (heads <= 0) return attention_error(kInvalidArgument, "num_heads must be positive");
  Isa isa;
  std::string why;
  if (!selected_isa(&isa, &why)) return attention_error(kInvalidArgument, why);
  *out = new AttentionKernel{heads, window, isa, {}};
  return nullptr;
}

Status* attention_compute(AttentionKernel& kernel, KernelContext* context) {
  const Value* values[7] = {};
  for (size_t i = 0; i < 7; ++i) {
    if (Status* s = g_ort.KernelContext_GetInput(context, i, &values[i])) return s;
    if (!values[i]) return attention_error(kInvalidArgument, "input " + std::to_string(i) + " is missing");
  }
  int64_t q_dims[8], c_dims[8], dims[8], count = 0, cache_count = 0;
  size_t q_rank = 0, c_rank = 0, rank = 0;
  if (Status* s = shape_of(values[0], q_dims, &q_rank, &count)) return s;
  if (Status* s = shape_of(values[1], c_dims, &c_rank, &cache_count)) return s;
  if (q_rank != 3 || c_rank != 4)
    return attention_error(kInvalidArgument, "qkv must be [B, S, 3 H D] and the caches [B, H, C, D]");
  const int64_t batch = q_dims[0], seq = q_dims[1], heads = kernel.heads, head_size = c_dims[3], capacity = c_dims[2];
  if (c_dims[0] != batch || c_dims[1] != heads || q_dims[2] != 3 * heads * head_size)
    return attention_error(kInvalidArgument, "qkv [" + std::to_string(batch) + ", " + std::to_string(seq) + ", " +
                                                 std::to_string(q_dims[2]) + "] does not match the cache's [B, H, C, D] = [" +
                                                 std::to_string(c_dims[0]) + ", " + std::to_string(c_dims[1]) + ", " +
                                                 std::to_string(capacity) + ", " + std::to_string(head_size) + "]");
  if (Status* s = shape_of(values[2], dims, &rank, &count)) return s;
  if (count != cache_count) return attention_error(kInvalidArgument, "past_value's shape differs from past_key's");
  if (Status* s = shape_of(values[3], dims, &rank, &count)) return s;
  if (count != batch) return attention_error(kInvalidArgument, "seqlens_k must hold one length per row");
  if (Status* s = shape_of(values[4], dims, &rank, &count)) return s;
  if (count != 1) return attention_error(kInvalidArgument, "total_sequence_length must be one value");
  void* data[7];
  for (int i = 0; i < 7; ++i) {
    if (Status* s = g_ort.GetTensorMutableData(const_cast<Value*>(values[i]), &data[i])) return s;
  }
  for (int i = 5; i < 7; ++i) {
    if (kernel.checked[i - 5].load(std::memory_order_relaxed) == data[i]) continue;
    if (Status* s = shape_of(values[i], dims, &rank, &count)) return s;
    if (count != heads * head_size) return attention_error(kInvalidArgument, "k_scale and v_scale must hold H * D values");
    kernel.checked[i - 5].store(data[i], std::memory_order_relaxed);
  }
  const int32_t* seqlens = static_cast<const int32_t*>(data[3]);
  const int32_t total = *static_cast<const int32_t*>(data[4]);
  const bool first_prompt = total == seq;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = static_cast<int64_t>(seqlens[b]) + 1;
    if (length > capacity || length < (first_prompt ? 1 : seq))
      return attention_error(kInvalidArgument, "row " + std::to_string(b) + " would hold " + std::to_string(length) +
                                                   " positions with " + std::to_string(seq) + " new in a cache of " +
                                                   std::to_string(capacity));
  }
  int64_t out_dims[3] = {batch, seq, heads * head_size};
  Value* outputs[3] = {};
  if (Status* s = g_ort.KernelContext_GetOutput(context, 0, out_dims, 3, &outputs[0])) return s;
  for (int i = 1; i < 3; ++i) {
    if (Status* s = g_ort.KernelContext_GetOutput(context, i, c_dims, 4, &outputs[i])) return s;
  }
  void* out_data[3];
  for (int i = 0; i < 3; ++i) {
    if (Status* s = g_ort.GetTensorMutableData(outputs[i], &out_data[i])) return s;
  }
  // Bound to the past's memory, the present is updated in place; otherwise it starts as a copy.
  for (int i = 1; i < 3; ++i) {
    if (out_data[i] != data[i]) std::memcpy(out_data[i], data[i], static_cast<size_t>(cache_count));
  }
  if (batch == 0 || seq == 0) return nullptr;
  neoedge::AttentionProblem p{static_cast<const float*>(data[0]), static_cast<int8_t*>(out_data[1]),
                              static_cast<int8_t*>(out_data[2]), seqlens, static_cast<const float*>(data[5]),
                              static_cast<const float*>(data[6]), static_cast<float*>(out_data[0]),
                              batch, seq, heads, head_size, capacity, kernel.window, first_prompt};
  neoedge::Parallel parallel{pool_run, context};
  if (!neoedge::run_attention(p, parallel, kernel.isa)) return attention_error(kRuntimeException, "the thread pool failed");
  return nullptr;
}

void NEO_ORT_CALL destroy_attention(void* kernel) { delete static_cast<AttentionKernel*>(kernel); }
const char* NEO_ORT_CALL attention_name(const CustomOp*) { return kAttentionName; }
ElementType NEO_ORT_CALL attention_input_type(const CustomOp*, size_t index) {
  return index == 1 || index == 2 ? kInt8 : index == 3 || index == 4 ? kInt32 : kFloat;
}
size_t NEO_ORT_CALL attention_input_count(const CustomOp*) { return 7; }
ElementType NEO_ORT_CALL attention_output_type(const CustomOp*, size_t index) { return index == 0 ? kFloat : kInt8; }
size_t NEO_ORT_CALL attention_output_count(const CustomOp*) { return 3; }
InputOutputCharacteristic NEO_ORT_CALL required(const CustomOp*, size_t) { return kRequired; }

const CustomOp kAttentionOp = make_op(attention_name, attention_input_type, attention_input_count, attention_output_type,
                                      attention_output_count, required, output_characteristic, create_attention,
                                      guarded<AttentionKernel, attention_compute, attention_error>, destroy_attention);

// ---------------------------------------------------------------------------------------------
// GatherBlockQuantized: com.microsoft's for the rows of a MatMulNBits table (GPT-Neo's embedding,
// tied to the lm_head): data [V, C, block * bits / 8] uint8, indices int64, scales [V, C, 1] float,
// optional zero points [V, C, 1] uint8 (8 bits); gather_axis 0, quantize_axis 2; output
// [*indices, C, block] float. It reads data in the tiled layout where the lm_head's kernel tiled it.

constexpr const char* kGatherName = "GatherBlockQuantized";

struct GatherKernel {
  int64_t bits, block;
  std::vector<const void*> registered;  // its constant scales and zero points, read as they are
};

Status* gather_error(ErrorCode code, const std::string& message) {
  return g_ort.CreateStatus(code, ("neoedge.kernels GatherBlockQuantized: " + message).c_str());
}

Status* NEO_ORT_CALL create_gather(const CustomOp*, const Api*, const KernelInfo* info, void** out) {
  *out = nullptr;
  int64_t bits = 4, block = 128, gather_axis = 0, quantize_axis = 1;
  read_attribute(info, "bits", &bits, false);
  read_attribute(info, "block_size", &block, false);
  read_attribute(info, "gather_axis", &gather_axis, false);
  read_attribute(info, "quantize_axis", &quantize_axis, false);
  if (bits != 4 && bits != 8) return gather_error(kInvalidArgument, "bits must be 4 or 8");
  if (block < 16 || block > 256 || (block & (block - 1)))
    return gather_error(kInvalidArgument, "block_size must be a power of two in 16..256");
  if (gather_axis != 0 || quantize_axis != 2)
    return gather_error(kInvalidArgument, "only gather_axis 0 and quantize_axis 2 are implemented");
  auto* kernel = new GatherKernel{bits, block, {}};
  // Its scales and zero points are read as they are: no MatMulNBits kernel may rearrange them.
  for (size_t i = 2; i < 4; ++i) {
    const Value* value = nullptr;
    void* data = nullptr;
    Status* s = constant_input(info, i, &value, &data);
    std::string why;
    if (!s && data && !neoedge::pin_plain(data, &why)) s = gather_error(kInvalidArgument, why);
    if (s) {
      release_registrations(kernel->registered);
      delete kernel;
      return s;
    }
    if (data) kernel->registered.push_back(data);
  }
  *out = kernel;
  return nullptr;
}

Status* gather_compute(GatherKernel& kernel, KernelContext* context) {
  size_t input_count = 0;
  if (Status* s = g_ort.KernelContext_GetInputCount(context, &input_count)) return s;
  const Value* values[4] = {};
  for (size_t i = 0; i < 4 && i < input_count; ++i) {
    if (Status* s = g_ort.KernelContext_GetInput(context, i, &values[i])) return s;
  }
  if (!values[0] || !values[1] || !values[2]) return gather_error(kInvalidArgument, "data, indices and scales are required");
  int64_t d_dims[8], i_dims[8], dims[8], d_count = 0, i_count = 0, count = 0;
  size_t d_rank = 0, i_rank = 0, rank = 0;
  if (Status* s = shape_of(values[0], d_dims, &d_rank, &d_count)) return s;
  if (Status* s = shape_of(values[1], i_dims, &i_rank, &i_count)) return s;
  if (d_rank != 3 || d_dims[2] * 8 / kernel.bits != kernel.block || i_rank > 6)
    return gather_error(kInvalidArgument, "data must be [V, C, block * bits / 8] and indices of rank 6 at most");
  const int64_t vocab = d_dims[0], blocks = d_dims[1], width = blocks * kernel.block;
  if (Status* s = shape_of(values[2], dims, &rank, &count)) return s;
  if (count != vocab * blocks) return gather_error(kInvalidArgument, "scales must hold V * C values");
  if (values[3]) {
    if (kernel.bits != 8) return gather_error(kNotImplemented, "4-bit zero points are not implemented");
    if (Status* s = shape_of(values[3], dims, &rank, &count)) return s;
    if (count != vocab * blocks) return gather_error(kInvalidArgument, "zero_points must hold V * C values");
  }
  void* data[4] = {};
  for (int i = 0; i < 4; ++i) {
    if (values[i]) {
      if (Status* s = g_ort.GetTensorMutableData(const_cast<Value*>(values[i]), &data[i])) return s;
    }
  }
  // The table is tiled if a MatMulNBits kernel registered it for that and nothing pinned it.
  const std::shared_ptr<neoedge::TiledShared> shared = neoedge::find_tiled(data[0]);
  const neoedge::TiledWeights* tiled =
      shared && shared->weights.b == data[0] && !shared->pinned.load(std::memory_order_relaxed) ? &shared->weights
                                                                                                 : nullptr;
  if (tiled && (tiled->n != vocab || tiled->k != width || tiled->bits != kernel.bits || tiled->block != kernel.block))
    return gather_error(kInvalidArgument, "data is tiled for a MatMulNBits node of another shape");
  int64_t out_dims[8];
  for (size_t i = 0; i < i_rank; ++i) out_dims[i] = i_dims[i];
  out_dims[i_rank] = blocks;
  out_dims[i_rank + 1] = kernel.block;
  Value* output = nullptr;
  if (Status* s = g_ort.KernelContext_GetOutput(context, 0, out_dims, i_rank + 2, &output)) return s;
  if (i_count == 0) return nullptr;
  void* out = nullptr;
  if (Status* s = g_ort.GetTensorMutableData(output, &out)) return s;
  const int64_t* ids = static_cast<const int64_t*>(data[1]);
  const float* scales = static_cast<const float*>(data[2]);
  const uint8_t* zp = static_cast<const uint8_t*>(data[3]);
  for (int64_t i = 0; i < i_count; ++i) {
    // Stock GatherBlockQuantized reads past the table for a bad id; this refuses it.
    if (ids[i] < 0 || ids[i] >= vocab)
      return gather_error(kInvalidArgument, "index " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                                " is outside the table's " + std::to_string(vocab) + " rows");
    if (tiled) tiled->ensure(ids[i] / neoedge::kTileHeight);  // the lm_head may not have read it yet
    neoedge::dequantize_row(static_cast<const uint8_t*>(data[0]), vocab, width, static_cast<int>(kernel.bits),
                            static_cast<int>(kernel.block), tiled != nullptr, ids[i], scales + ids[i] * blocks,
                            zp ? zp + ids[i] * blocks : nullptr, static_cast<float*>(out) + i * width);
  }
  return nullptr;
}

void NEO_ORT_CALL destroy_gather(void* kernel) {
  release_registrations(static_cast<GatherKernel*>(kernel)->registered);
  delete static_cast<GatherKernel*>(kernel);
}
const char* NEO_ORT_CALL gather_name(const CustomOp*) { return kGatherName; }
ElementType NEO_ORT_CALL gather_input_type(const CustomOp*, size_t index) {
  return index == 1 ? kInt64 : index == 2 ? kFloat : kUint8;
}
size_t NEO_ORT_CALL gather_input_count(const CustomOp*) { return 4; }
InputOutputCharacteristic NEO_ORT_CALL gather_input_characteristic(const CustomOp*, size_t index) {
  return index == 3 ? kOptional : kRequired;
}

const CustomOp kGatherOp = make_op(gather_name, gather_input_type, gather_input_count, output_type, output_count,
                                   gather_input_characteristic, output_characteristic, create_gather,
                                   guarded<GatherKernel, gather_compute, gather_error>, destroy_gather);

// ---------------------------------------------------------------------------------------------
// SkipLayerNormalization: inputs input and skip [..., W], gamma [W], optional beta and bias [W];
// outputs the normalised rows and, optionally (output 3), input + skip + bias. Outputs 1 and 2 (mean,
// inverse deviation) are refused: the kernel graph converts only nodes that do not ask for them.
// FastGelu: input [..., W], optional bias [W].

// The per-channel inputs (SkipLayerNormalization's gamma, beta and bias, FastGelu's bias) are
// initializers in neoedge's graphs: their element counts are read once, at creation, instead of
// through a shape query at every run (three a SkipLayerNormalization, ~70 a decode step).
constexpr size_t kRowInputs = 5;

struct RowKernel {
  float epsilon;
  Isa isa;
  const void* constant[kRowInputs];  // data of the constant inputs, null where not constant
  int64_t constant_count[kRowInputs];
};

Status* skip_norm_error(ErrorCode code, const std::string& message) {
  return g_ort.CreateStatus(code, ("neoedge.kernels SkipLayerNormalization: " + message).c_str());
}

Status* gelu_error(ErrorCode code, const std::string& message) {
  return g_ort.CreateStatus(code, ("neoedge.kernels FastGelu: " + message).c_str());
}

// The kernel of a row op whose inputs from `first` on are per-channel (read once if constant).
Status* row_kernel(const KernelInfo* info, float epsilon, Isa isa, size_t first, void** out) {
  auto kernel = std::make_unique<RowKernel>(RowKernel{epsilon, isa, {}, {}});
  size_t inputs = 0;
  if (Status* s = g_ort.KernelInfo_GetInputCount(info, &inputs)) return s;
  for (size_t i = first; i < inputs && i < kRowInputs; ++i) {
    const Value* value = nullptr;
    void* data = nullptr;
    if (Status* s = constant_input(info, i, &value, &data)) return s;
    if (!value) continue;
    if (Status* s = element_count(value, &kernel->constant_count[i])) return s;
    kernel->constant[i] = data;
  }
  *out = kernel.release();
  return nullptr;
}

Status* NEO_ORT_CALL create_skip_norm(const CustomOp*, const Api*, const KernelInfo* info, void** out) {
  *out = nullptr;
  float epsilon = 1e-12f;  // com.microsoft's default
  Status* status = g_ort.KernelInfoGetAttribute_float(info, "epsilon", &epsilon);
  if (status) g_ort.ReleaseStatus(status);
  Isa isa;
  std::string why;
  if (!selected_isa(&isa, &why)) return skip_norm_error(kInvalidArgument, why);
  return row_kernel(info, epsilon, isa, 2, out);
}

Status* NEO_ORT_CALL create_gelu(const CustomOp*, const Api*, const KernelInfo* info, void** out) {
  *out = nullptr;
  Isa isa;
  std::string why;
  if (!selected_isa(&isa, &why)) return gelu_error(kInvalidArgument, why);
  return row_kernel(info, 0.f, isa, 1, out);
}

// Inputs [0, count) of a row op (null where absent), their data, and the first one's shape.
Status* row_inputs(KernelContext* context, size_t count, const Value** values, const float** data, int64_t* dims,
                   size_t* rank, int64_t* elements) {
  size_t present = 0;
  if (Status* s = g_ort.KernelContext_GetInputCount(context, &present)) return s;
  for (size_t i = 0; i < count; ++i) {
    values[i] = nullptr;
    data[i] = nullptr;
    if (i >= present) continue;
    if (Status* s = g_ort.KernelContext_GetInput(context, i, &values[i])) return s;
    if (!values[i]) continue;
    void* p = nullptr;
    if (Status* s = g_ort.GetTensorMutableData(const_cast<Value*>(values[i]), &p)) return s;
    data[i] = static_cast<const float*>(p);
  }
  if (!values[0]) return g_ort.CreateStatus(kInvalidArgument, "neoedge.kernels: the first input is missing");
  return shape_of(values[0], dims, rank, elements);
}

// Whether optional input `index` (`value`, its data `data`) is absent or holds exactly `width` values;
// its shape is queried only if it is not the constant the kernel read at creation.
Status* width_matches(const RowKernel& kernel, size_t index, const Value* value, const void* data, int64_t width,
                      bool* ok) {
  *ok = true;
  if (!value) return nullptr;
  int64_t count = 0;
  if (data && data == kernel.constant[index]) {
    count = kernel.constant_count[index];
  } else {
    int64_t dims[8];
    size_t rank = 0;
    if (Status* s = shape_of(value, dims, &rank, &count)) return s;
  }
  *ok = count == width;
  return nullptr;
}

Status* skip_norm_compute(RowKernel& kernel, KernelContext* context) {
  const Value* values[5];
  const float* data[5];
  int64_t dims[8], elements = 0;
  size_t rank = 0;
  if (Status* s = row_inputs(context, 5, values, data, dims, &rank, &elements)) return s;
  if (rank < 1 || !values[1] || !values[2]) return skip_norm_error(kInvalidArgument, "input, skip and gamma are required");
  const int64_t width = dims[rank - 1], rows = width ? elements / width : 0;
  int64_t skip_dims[8], skip_count = 0;
  size_t skip_rank = 0;
  if (Status* s = shape_of(values[1], skip_dims, &skip_rank, &skip_count)) return s;
  if (skip_count != elements) return skip_norm_error(kInvalidArgument, "skip must have the input's shape");
  for (size_t i = 2; i < 5; ++i) {
    bool ok = true;
    if (Status* s = width_matches(kernel, i, values[i], data[i], width, &ok)) return s;
    if (!ok) return skip_norm_error(kInvalidArgument, "gamma, beta and bias must hold one value per channel");
  }
  size_t outputs = 0;
  if (Status* s = g_ort.KernelContext_GetOutputCount(context, &outputs)) return s;
  Value* out = nullptr;
  if (Status* s = g_ort.KernelContext_GetOutput(context, 0, dims, rank, &out)) return s;
  void* out_data = nullptr;
  if (Status* s = g_ort.GetTensorMutableData(out, &out_data)) return s;
  void* sum_data = nullptr;
  if (outputs > 3) {
    Value* sum = nullptr;
    if (Status* s = g_ort.KernelContext_GetOutput(context, 3, dims, rank, &sum)) return s;
    if (sum) {
      if (Status* s = g_ort.GetTensorMutableData(sum, &sum_data)) return s;
    }
  }
  if (rows == 0) return nullptr;
  neoedge::SkipNormProblem p{data[0], data[1], data[2], data[3], data[4], static_cast<float*>(out_data),
                             static_cast<float*>(sum_data), rows, width, kernel.epsilon};
  neoedge::Parallel parallel{pool_run, context};
  if (!neoedge::run_skip_norm(p, parallel, kernel.isa)) return skip_norm_error(kRuntimeException, "the thread pool failed");
  return nullptr;
}

Status* gelu_compute(RowKernel& kernel, KernelContext* context) {
  const Value* values[2];
  const float* data[2];
  int64_t dims[8], elements = 0;
  size_t rank = 0;
  if (Status* s = row_inputs(context, 2, values, data, dims, &rank, &elements)) return s;
  if (rank < 1) return gelu_error(kInvalidArgument, "the input must have a last dimension");
  const int64_t width = dims[rank - 1], rows = width ? elements / width : 0;
  bool ok = true;
  if (Status* s = width_matches(kernel, 1, values[1], data[1], width, &ok)) return s;
  if (!ok) return gelu_error(kInvalidArgument, "bias must hold one value per channel");
  Value* out = nullptr;
  if (Status* s = g_ort.KernelContext_GetOutput(context, 0, dims, rank, &out)) return s;
  void* out_data = nullptr;
  if (Status* s = g_ort.GetTensorMutableData(out, &out_data)) return s;
  if (rows == 0) return nullptr;
  neoedge::GeluProblem p{data[0], data[1], static_cast<float*>(out_data), rows, width};
  neoedge::Parallel parallel{pool_run, context};
  if (!neoedge::run_gelu(p, parallel, kernel.isa)) return gelu_error(kRuntimeException, "the thread pool failed");
  return nullptr;
}

void NEO_ORT_CALL destroy_row_kernel(void* kernel) { delete static_cast<RowKernel*>(kernel); }
const char* NEO_ORT_CALL skip_norm_name(const CustomOp*) { return "SkipLayerNormalization"; }
const char* NEO_ORT_CALL gelu_name(const CustomOp*) { return "FastGelu"; }
ElementType NEO_ORT_CALL float_type(const CustomOp*, size_t) { return kFloat; }
size_t NEO_ORT_CALL skip_norm_input_count(const CustomOp*) { return 5; }
size_t NEO_ORT_CALL skip_norm_output_count(const CustomOp*) { return 4; }
size_t NEO_ORT_CALL gelu_input_count(const CustomOp*) { return 2; }
InputOutputCharacteristic NEO_ORT_CALL skip_norm_input_characteristic(const CustomOp*, size_t index) {
  return index >= 3 ? kOptional : kRequired;
}
InputOutputCharacteristic NEO_ORT_CALL first_required(const CustomOp*, size_t index) {
  return index == 0 ? kRequired : kOptional;
}

const CustomOp kSkipNormOp = make_op(skip_norm_name, float_type, skip_norm_input_count, float_type, skip_norm_output_count,
                                     skip_norm_input_characteristic, first_required, create_skip_norm,
                                     guarded<RowKernel, skip_norm_compute, skip_norm_error>, destroy_row_kernel);

const CustomOp kGeluOp = make_op(gelu_name, float_type, gelu_input_count, float_type, output_count, first_required,
                                 output_characteristic, create_gelu, guarded<RowKernel, gelu_compute, gelu_error>,
                                 destroy_row_kernel);

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
    if (Status* s = g_ort.CustomOpDomain_Add(domain, &kTiledOp)) return s;
    if (Status* s = g_ort.CustomOpDomain_Add(domain, &kAttentionOp)) return s;
    if (Status* s = g_ort.CustomOpDomain_Add(domain, &kSkipNormOp)) return s;
    if (Status* s = g_ort.CustomOpDomain_Add(domain, &kGeluOp)) return s;
    if (Status* s = g_ort.CustomOpDomain_Add(domain, &kGatherOp)) return s;
    g_domain = domain;
  }
  return g_ort.AddCustomOpDomain(options, g_domain);
}

// For the Python side: which paths exist here, without creating a session.
NEO_EXPORT int neoedge_kernels_interface_version() { return 4; }
NEO_EXPORT const char* neoedge_kernels_best_isa() { return neoedge::isa_name(neoedge::best_isa()); }
// What prompt attention runs on, on path `name` here: "amx-bf16 tiles", "avx512" or "portable" (for
// GPT-Neo's head sizes: the tiles take 64 and 128, the AVX-512 path 16 to 128 in powers of two).
NEO_EXPORT const char* neoedge_kernels_attention_path(const char* name) {
  Isa isa;
  if (!neoedge::isa_from_name(name, &isa) || !neoedge::isa_supported(isa)) return "portable";
  if (isa >= Isa::amx && neoedge::amx_bf16_supported()) return "amx-bf16 tiles";
  return isa >= Isa::avx512vnni ? "avx512" : "portable";
}
NEO_EXPORT int neoedge_kernels_isa_supported(const char* name) {
  Isa isa;
  return neoedge::isa_from_name(name, &isa) && neoedge::isa_supported(isa) ? 1 : 0;
}
