// Launchers of the CUDA kernels (torch-free: the parameter structs of
// op_params.h and a stream), shared between the nvcc-compiled kernels and the
// host-side operator registration.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "../op_params.h"

namespace savae_fast {
namespace cuda {

// Rows of the [kMaxPartials, 2] workspace of the two-stage reductions.
constexpr int kMaxPartials = 1024;

// forward_step and reverse_direction reduce over the whole tensor before their
// element-wise part. Up to single_block_max_elements() elements that is one
// launch of one block (reduction and update in the same block, no workspace);
// above it, two launches with a [reduction_partials(numel), 2] workspace.
// The limit is a process-wide setting (tests run both paths on the same shapes).
int64_t reduction_partials(int64_t numel);  // 0: the one-block path, no workspace
int64_t single_block_max_elements();
void set_single_block_max_elements(int64_t numel);

template <typename T>
void launch_sample(const SampleParams<T>& p, cudaStream_t stream);

template <typename T>
void launch_forward_step(const ForwardStepParams<T>& p, cudaStream_t stream);

template <typename T>
void launch_reverse_direction(const ReverseDirectionParams<T>& p, cudaStream_t stream);

template <typename T>
void launch_reverse_update(const ReverseUpdateParams<T>& p, cudaStream_t stream);

// Element types of accumulate_.
enum class AccumulateType { kFloat, kDouble, kHalf, kBFloat16 };

// total += value for every item, a few launches for all of them (items are
// passed by value in the kernel arguments, kMaxItemsPerLaunch at a time).
void launch_accumulate(AccumulateType type, const std::vector<AccumulateItem>& items, cudaStream_t stream);

}  // namespace cuda
}  // namespace savae_fast
