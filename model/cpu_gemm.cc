// A float32 matrix product for XLA:CPU through the BLAS sgemm whose address Python hands in
// (model/cpu_gemm.py: SciPy's OpenBLAS). Built on first use; see cpu_gemm.py for why.
#include <cstdint>
#include <limits>
#include <string>

#include "cpu_blas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

sgemm_t flaxpod_sgemm = nullptr;

extern "C" void flaxpod_set_sgemm(void* sgemm) { flaxpod_sgemm = reinterpret_cast<sgemm_t>(sgemm); }

static ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "flaxpod cpu_gemm: " + what);
}

// Row-major c[m, n] = op(a) @ op(b), op(a) [m, k], op(b) [k, n].
static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                       bool trans_a, bool trans_b) {
  if (flaxpod_sgemm == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "flaxpod cpu_gemm: no sgemm set");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2) return Invalid("operands must be 2-D");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n) return Invalid("shapes do not match");
  const int64_t most = std::numeric_limits<int>::max();
  if (ad[0] > most || ad[1] > most || bd[0] > most || bd[1] > most) return Invalid("a dimension exceeds 2^31-1");
  if (m == 0 || n == 0) return ffi::Error::Success();
  // Leading dimensions: a row-major [r, c] matrix has rows c apart (at least 1 for BLAS).
  const int lda = static_cast<int>(ad[1] > 0 ? ad[1] : 1), ldb = static_cast<int>(bd[1] > 0 ? bd[1] : 1);
  // beta = 0: BLAS does not read c, which XLA leaves uninitialised (k == 0 gives zeros).
  row_major_gemm(trans_a, trans_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
                 a.typed_data(), lda, b.typed_data(), ldb, 0.0f, c->typed_data(), static_cast<int>(n));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxpodGemmF32, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
