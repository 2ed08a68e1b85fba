// CUDA backend of the savae_fast:: operators (csrc/op_impl.h): the torch-free
// launchers of kernels.cu on the current stream of the tensors' device.
// Nothing here waits for the device.
#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>

#include <vector>

#include "../op_impl.h"
#include "kernels.h"

namespace savae_fast {
namespace {

cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

void check_launch() { STD_CUDA_KERNEL_LAUNCH_CHECK(); }

struct CudaBackend {
  static constexpr const char* kName = "CUDA";
  static int64_t partials_rows(int64_t numel) { return cuda::reduction_partials(numel); }
  static bool on_device(const torch::stable::Tensor& t) { return t.is_cuda(); }

  // The tensors' device is the current device for the duration of a call.
  struct Guard {
    explicit Guard(const torch::stable::Tensor& t) : device(t.get_device_index()) {}
    torch::stable::accelerator::DeviceGuard device;
  };

  template <typename T>
  static void sample(const SampleParams<T>& p) { launch(p, cuda::launch_sample<T>); }
  template <typename T>
  static void forward_step(const ForwardStepParams<T>& p) { launch(p, cuda::launch_forward_step<T>); }
  template <typename T>
  static void reverse_direction(const ReverseDirectionParams<T>& p) { launch(p, cuda::launch_reverse_direction<T>); }
  template <typename T>
  static void reverse_update(const ReverseUpdateParams<T>& p) { launch(p, cuda::launch_reverse_update<T>); }
  // On the current stream of the current device (the tensors' device: op_impl.h's Guard).
  template <class Params>
  static void launch(const Params& p, void (*launcher)(const Params&, cudaStream_t)) {
    launcher(p, current_stream(current_index()));
    check_launch();
  }

  static void accumulate(ops::ScalarType dtype, const std::vector<AccumulateItem>& items) {
    cuda::AccumulateType type;
    switch (dtype) {
      case ops::ScalarType::Float: type = cuda::AccumulateType::kFloat; break;
      case ops::ScalarType::Double: type = cuda::AccumulateType::kDouble; break;
      case ops::ScalarType::Half: type = cuda::AccumulateType::kHalf; break;
      case ops::ScalarType::BFloat16: type = cuda::AccumulateType::kBFloat16; break;
      default: STD_TORCH_CHECK(false, "savae_fast::accumulate_: unsupported dtype ", ops::dtype_str(dtype));
    }
    cuda::launch_accumulate(type, items, current_stream(current_index()));
    check_launch();
  }

 private:
  // The Guard of op_impl.h made the tensors' device current.
  static int32_t current_index() { return torch::stable::accelerator::getCurrentDeviceIndex(); }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(savae_fast, CUDA, m) { ops::register_backend<CudaBackend>(m); }

}  // namespace savae_fast
