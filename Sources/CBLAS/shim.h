// OpenBLAS's CBLAS interface (Debian libopenblas-dev). pkg-config `openblas` gives the
// include path of the pthread variant; `blas` would miss the openblas_* symbols.
#include <cblas.h>

// The LAPACK routine OpenBLAS exports that GPTQ's factorization uses (Fortran ABI: every
// argument by pointer; the trailing size_t is the hidden length of the character
// argument gfortran passes).
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t uplo_len);
