// Attention over an in-place int8 KV cache, with GroupQueryAttention's semantics as neoedge's graphs
// use it (onnxruntime 1.32, CPU; checked against it by tests/test_kernel_attention.py):
//
// - qkv is packed [B, S, 3, H, D] (query, key, value; as many key/value heads as query heads); no
//   rotary embedding, no bias; the scores are not scaled (GPT-Neo), scale = 1.
// - The cache [B, H, C, D] holds int8 values with per-(head, channel) scales: a new key is written
//   as clamp(round_half_even(k * (1 / k_scale)), -128, 127) and read back as q * k_scale, for the new
//   positions too (attention always reads the cache).
// - Row b holds L = seqlens[b] + 1 positions after this call. In a first prompt (the total sequence
//   length equals S) its S new tokens go to positions 0..S-1 (the ones past L are padding of a
//   ragged batch); otherwise to L - S..L-1. Every new position below C is written.
// - Query at absolute position p sees keys j <= min(p, L - 1), and with a local window w also only
//   j > p - w (the window counts the current position).
//
// Why not onnxruntime's own kernel: it converts every cached element to fp32 and sums each key row
// horizontally, per head and row, which made attention the largest cost of long prompts (60% at
// 1,024 tokens), of a chat turn over a long history and of batched decode (4.6 of 12 ms a step at
// batch 8).
#pragma once

#include <cstdint>

#include "qgemm.h"

namespace neoedge {

struct AttentionProblem {
  const float* qkv;        // [B, S, 3, H, D]
  int8_t* k_cache;         // [B, H, C, D]: the present cache (past copied in first if distinct)
  int8_t* v_cache;
  const int32_t* seqlens;  // [B]: index of each row's last position after this call
  const float* k_scale;    // [H, D]
  const float* v_scale;
  float* out;              // [B, S, H * D]
  int64_t batch, seq, heads, head_size, capacity;
  int64_t window;          // <= 0: global attention
  bool first_prompt;

  int64_t length(int64_t b) const { return static_cast<int64_t>(seqlens[b]) + 1; }
  int64_t past(int64_t b) const { return first_prompt ? 0 : length(b) - seq; }
  const float* query(int64_t b, int64_t i, int64_t h) const {
    return qkv + ((b * seq + i) * 3 * heads + h) * head_size;
  }
  const float* new_key(int64_t b, int64_t i, int64_t h) const { return query(b, i, h) + heads * head_size; }
  const float* new_value(int64_t b, int64_t i, int64_t h) const { return query(b, i, h) + 2 * heads * head_size; }
  int8_t* key_row(int64_t b, int64_t h, int64_t j) const { return k_cache + ((b * heads + h) * capacity + j) * head_size; }
  int8_t* value_row(int64_t b, int64_t h, int64_t j) const { return v_cache + ((b * heads + h) * capacity + j) * head_size; }
  // Keys [first, last] that query i of row b sees (empty when last < first: padding of a ragged prompt).
  void key_range(int64_t b, int64_t i, int64_t* first, int64_t* last) const {
    const int64_t p = past(b) + i;
    *last = p < length(b) - 1 ? p : length(b) - 1;
    *first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
  }
};

// Calls write(k, v, key_row, value_row) for each of row b, head h's new positions that lands in the
// cache: its new key and value, and where they go.
template <class Write>
void for_each_new_position(const AttentionProblem& p, int64_t b, int64_t h, Write&& write) {
  for (int64_t i = 0; i < p.seq; ++i) {
    const int64_t j = p.past(b) + i;
    if (j < 0 || j >= p.capacity) continue;
    write(p.new_key(b, i, h), p.new_value(b, i, h), p.key_row(b, h, j), p.value_row(b, h, j));
  }
}

// Writes row b, head h's new keys and values into the cache (the AVX-512 form: head sizes that are
// multiples of 16, the same bytes).
void write_new_positions(const AttentionProblem& p, int64_t b, int64_t h);
void write_new_positions_avx512(const AttentionProblem& p, int64_t b, int64_t h);
// Outputs of queries [i0, i1) of row b, head h (their keys already in the cache).
void attend_portable(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1);
bool attend_avx512_applies(const AttentionProblem& p);
void attend_avx512(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1);
// Prompt queries on AMX-BF16 tiles (attention_amx.cpp): head sizes 64 and 128, 4..128 queries a task,
// on CPUs where amx_bf16_supported().
bool attend_amx_applies(const AttentionProblem& p, int64_t queries);
void attend_amx(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1);
// NaN outputs for queries [i0, i1) with a NaN or infinite value (AVX-512; head size a multiple of 16),
// as the fp32 loop gives them: the vector paths' masked maxima and clamped exp turn them into zeros
// or finite values.
void nan_for_nonfinite_queries(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1);

// The whole call on the pool: the cache writes, then the attention. False if the pool failed.
bool run_attention(const AttentionProblem& p, const Parallel& parallel, Isa isa);

}  // namespace neoedge
