// OpenBLAS's CBLAS interface (Debian libopenblas-dev). pkg-config `openblas` gives the
// include path of the pthread variant; `blas` would miss the openblas_* symbols.
#include <cblas.h>

// LAPACK routines OpenBLAS exports (Fortran ABI: every argument by pointer; the trailing
// size_t is the hidden length of the character arguments gfortran passes).
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info, size_t uplo_len);
void dtrtri_(const char *uplo, const char *diag, const int *n, double *a, const int *lda, int *info,
             size_t uplo_len, size_t diag_len);
