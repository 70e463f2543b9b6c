// The attention's cache writes, its portable path and the dispatch (see attention.h).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace neoedge {

namespace {

// nearbyint: round half to even (the default rounding mode), as onnxruntime's quantizer; saturated;
// NaN (a NaN input, or 0 / 0) as 0, where a cast of NaN would be undefined.
int8_t quantize_cached(float x) {
  if (std::isnan(x)) return 0;
  return static_cast<int8_t>(std::clamp(std::nearbyint(x), -128.f, 127.f));
}

}  // namespace

void write_new_positions(const AttentionProblem& p, int64_t b, int64_t h) {
  const int64_t d_count = p.head_size;
  const float* ks = p.k_scale + h * d_count;
  const float* vs = p.v_scale + h * d_count;
  for_each_new_position(p, b, h, [&](const float* k, const float* v, int8_t* kr, int8_t* vr) {
    // Times the scale's fp32 reciprocal, not divided by it: onnxruntime's quantizer does so, and
    // the two differ where x / s lands on a half (k / s = -104.5 where k x (1 / s) = -104.50001).
    for (int64_t d = 0; d < d_count; ++d) {
      kr[d] = quantize_cached(k[d] * (1.f / ks[d]));
      vr[d] = quantize_cached(v[d] * (1.f / vs[d]));
    }
  });
}

void attend_portable(const AttentionProblem& p, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  const int64_t d_count = p.head_size;
  const float* ks = p.k_scale + h * d_count;
  const float* vs = p.v_scale + h * d_count;
  std::vector<float> qs(static_cast<size_t>(d_count)), o(static_cast<size_t>(d_count)), scores;
  for (int64_t i = i0; i < i1; ++i) {
    float* out = p.out + (b * p.seq + i) * p.heads * d_count + h * d_count;
    int64_t first, last;
    p.key_range(b, i, &first, &last);
    if (last < first) {
      std::fill(out, out + d_count, 0.f);
      continue;
    }
    const float* q = p.query(b, i, h);
    for (int64_t d = 0; d < d_count; ++d) qs[d] = q[d] * ks[d];
    scores.resize(static_cast<size_t>(last - first + 1));
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t j = first; j <= last; ++j) {
      const int8_t* k = p.key_row(b, h, j);
      float s = 0.f;
      for (int64_t d = 0; d < d_count; ++d) s += qs[d] * static_cast<float>(k[d]);
      scores[j - first] = s;
      max = std::max(max, s);
    }
    std::fill(o.begin(), o.end(), 0.f);
    float sum = 0.f;
    for (int64_t j = first; j <= last; ++j) {
      const float e = std::exp(scores[j - first] - max);
      sum += e;
      const int8_t* v = p.value_row(b, h, j);
      for (int64_t d = 0; d < d_count; ++d) o[d] += e * static_cast<float>(v[d]);
    }
    for (int64_t d = 0; d < d_count; ++d) out[d] = o[d] / sum * vs[d];
  }
}

namespace {

// Queries per attention task: enough that a task's conversion of its keys to fp32 is shared, few
// enough that a 128-token chunk of 12 heads still gives every thread many tasks.
constexpr int64_t kQueriesPerTask = 32;
// The tile path converts each block of keys and values once per task for all the task's queries:
// at 32 queries a task that conversion was a third of its time.
constexpr int64_t kTileQueriesPerTask = 128;

struct Job {
  const AttentionProblem* p;
  Isa isa;
  int64_t per_task, query_tasks;
};

bool tile_path(const AttentionProblem& p, Isa isa, int64_t queries) {
#if defined(__x86_64__) || defined(_M_X64)
  return isa >= Isa::amx && amx_bf16_supported() && attend_amx_applies(p, queries);
#else
  (void)p, (void)isa, (void)queries;
  return false;
#endif
}

void write(const Job& job, int64_t b, int64_t h) {
#if defined(__x86_64__) || defined(_M_X64)
  if (job.isa >= Isa::avx512vnni && job.p->head_size % 16 == 0) {
    write_new_positions_avx512(*job.p, b, h);
    return;
  }
#endif
  write_new_positions(*job.p, b, h);
}

void write_task(void* user, size_t index) {
  const Job& job = *static_cast<const Job*>(user);
  const int64_t heads = job.p->heads;
  write(job, static_cast<int64_t>(index) / heads, static_cast<int64_t>(index) % heads);
}

void attend(const Job& job, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  const AttentionProblem& p = *job.p;
#if defined(__x86_64__) || defined(_M_X64)
  const bool tiles = tile_path(p, job.isa, i1 - i0);
  if (tiles || (job.isa >= Isa::avx512vnni && attend_avx512_applies(p))) {
    if (tiles) attend_amx(p, b, h, i0, i1);
    else attend_avx512(p, b, h, i0, i1);
    nan_for_nonfinite_queries(p, b, h, i0, i1);
    return;
  }
#endif
  attend_portable(p, b, h, i0, i1);
}

void attend_task(void* user, size_t index) {
  const Job& job = *static_cast<const Job*>(user);
  const AttentionProblem& p = *job.p;
  const int64_t t = static_cast<int64_t>(index) % job.query_tasks;
  const int64_t bh = static_cast<int64_t>(index) / job.query_tasks;
  const int64_t i0 = t * job.per_task;
  attend(job, bh / p.heads, bh % p.heads, i0, std::min(p.seq, i0 + job.per_task));
}

// Few queries per row (a decode step, a short message): each (row, head) writes its own new
// positions and attends in one task, and the tasks come in a few groups of consecutive (row, head)
// pairs: a decode step's pairs are a few microseconds of work each, about what the pool takes to
// hand out a task (at batch 8, 2 x 96 tasks a layer were most of the attention's time).
constexpr size_t kFusedGroups = 16;

struct FusedJob {
  const Job* job;
  size_t rows, groups;
};

void fused_task(void* user, size_t index) {
  const FusedJob& fused = *static_cast<const FusedJob*>(user);
  const AttentionProblem& p = *fused.job->p;
  const size_t begin = index * fused.rows / fused.groups, end = (index + 1) * fused.rows / fused.groups;
  for (size_t bh = begin; bh < end; ++bh) {
    const int64_t b = static_cast<int64_t>(bh) / p.heads, h = static_cast<int64_t>(bh) % p.heads;
    write(*fused.job, b, h);
    attend(*fused.job, b, h, 0, p.seq);
  }
}

}  // namespace

bool run_attention(const AttentionProblem& p, const Parallel& parallel, Isa isa) {
  const int64_t per_task = tile_path(p, isa, kTileQueriesPerTask) ? kTileQueriesPerTask : kQueriesPerTask;
  Job job{&p, isa, per_task, (p.seq + per_task - 1) / per_task};
  const size_t rows = static_cast<size_t>(p.batch * p.heads);
  if (job.query_tasks == 1) {
    FusedJob fused{&job, rows, std::min(rows, kFusedGroups)};
    return parallel(fused_task, fused.groups, &fused);
  }
  // Queries split over several tasks need every new key of their row first: two passes.
  if (!parallel(write_task, rows, &job)) return false;
  return parallel(attend_task, rows * static_cast<size_t>(job.query_tasks), &job);
}

}  // namespace neoedge
