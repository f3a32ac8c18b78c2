// The BLAS sgemm the kernels call, set once from Python (model/cpu_gemm.py: SciPy's OpenBLAS).
#pragma once

// Fortran BLAS: column-major, every argument by pointer, 32-bit integers (SciPy's LP64 build).
typedef void (*sgemm_t)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                        const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                        const float* beta, float* c, const int* ldc);

extern sgemm_t flaxpod_sgemm;

// Row-major c[m, n] = alpha op(a) op(b) + beta c, op(a) [m, k], op(b) [k, n], each matrix stored with its own
// row stride (ld*). A row-major matrix is its transpose in column-major order, so BLAS computes
// c^T = op(b)^T op(a)^T with the operands swapped.
inline void row_major_gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                           const float* b, int ldb, float beta, float* c, int ldc) {
  const char op_a = trans_a ? 'T' : 'N', op_b = trans_b ? 'T' : 'N';
  flaxpod_sgemm(&op_b, &op_a, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
