// seahal._native: native CPU kernels. Functions take raw data pointers (uintptr_t) and sizes, so
// the module depends on pybind11 only and works with any torch >= 2.5 build.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_codecs(py::module_& m);
void bind_gemm(py::module_& m);

PYBIND11_MODULE(_native, m) {
    m.doc() = "seahal native CPU kernels (number-format codecs, FP8/FP4 GEMMs)";
#ifdef SEAHAL_HAVE_OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    bind_codecs(m);
    bind_gemm(m);
}
