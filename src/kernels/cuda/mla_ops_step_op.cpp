// CUDA DeepSeek step ops: the argument checks shared with the CPU reference
// (kernels/mla_checks.h), the CUDA limits, then the launchers in mla_ops_step.cu.
#include "core/cuda_check.h"
#include "kernels/cuda/mla_ops_launch.h"
#include "kernels/cuda/mla_ops_step.h"
#include "kernels/mla_checks.h"

namespace moelora::cuda {
namespace {

cudaStream_t raw(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

Device gpu_of(const Tensor& t, const char* what) {
  MOELORA_CHECK(t.defined(), "{}: expected a tensor, found an undefined one", what);
  MOELORA_CHECK(t.device().is_cuda(), "{}: expected a CUDA tensor, found {}", what, t.describe());
  return t.device();
}

}  // namespace

void mla_kv_norm(Tensor& kv, const Tensor& weight, float eps, const Stream& stream) {
  const int64_t L = detail::check_mla_kv_norm(kv, weight, gpu_of(kv, "mla_kv_norm kv"));
  MOELORA_CUDA_CHECK(launch_mla_kv_norm(kv.data(), kv.dtype() == DType::bf16, weight.data(), eps,
                                        kv.size(0), kv.size(1), L, raw(stream)));
}

void grouped_router_margin(const Tensor& logits, const Tensor& correction_bias,
                           const RouterConfig& router, Tensor& margin, int64_t col,
                           const Stream& stream) {
  detail::check_grouped_router_margin(logits, correction_bias, router, margin, col,
                                      gpu_of(margin, "grouped_router_margin margin"));
  MOELORA_CHECK(router.num_experts <= kGroupedMarginMaxE &&
                    router.n_group <= kGroupedMarginMaxGroups,
                "cuda grouped_router_margin: {} experts in {} groups; at most {} experts and {} "
                "groups are supported",
                router.num_experts, router.n_group, kGroupedMarginMaxE,
                kGroupedMarginMaxGroups);
  GroupedMarginArgs a{};
  a.logits = logits.data<float>();
  a.correction_bias = router.use_correction_bias ? correction_bias.data<float>() : nullptr;
  a.margin = margin.data<float>();
  a.m = logits.size(0);
  a.cols = margin.size(1);
  a.col = col;
  a.E = router.num_experts;
  a.top_k = router.top_k;
  a.n_group = router.n_group;
  a.topk_group = router.topk_group;
  a.sigmoid = router.scoring != ScoringFunc::softmax;
  a.top2_sum = router.group_score == GroupScore::top2_sum;
  MOELORA_CUDA_CHECK(launch_grouped_router_margin(a, raw(stream)));
}

}  // namespace moelora::cuda
