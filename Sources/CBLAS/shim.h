// OpenBLAS's CBLAS interface (Debian libopenblas-dev). pkg-config `openblas` gives the
// include path of the pthread variant; `blas` would miss the openblas_* symbols.
#include <cblas.h>
