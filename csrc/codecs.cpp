// Bulk number-format codecs over raw buffers: fp32 -> format bytes and back (one code per byte).
#include <pybind11/pybind11.h>

#include "formats.hpp"

namespace py = pybind11;

namespace {

// dst[i] = codec(src[i]) for i < n; src and dst are data pointers of contiguous buffers.
template <typename In, typename Out, Out (*codec)(In)>
void convert(uintptr_t src, uintptr_t dst, int64_t n) {
    const In* in = reinterpret_cast<const In*>(src);
    Out* out = reinterpret_cast<Out*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = codec(in[i]);
}

template <typename In, typename Out, Out (*codec)(In)>
void bind(py::module_& m, const char* name, const char* doc) {
    m.def(name, &convert<In, Out, codec>, doc, py::arg("src"), py::arg("dst"), py::arg("n"),
          py::call_guard<py::gil_scoped_release>());
}

}  // namespace

void bind_codecs(py::module_& m) {
    using namespace seahal;
    bind<float, uint8_t, e4m3_encode>(m, "e4m3_encode", "fp32 -> e4m3fn bytes (RNE, saturate ±448, NaN kept)");
    bind<uint8_t, float, e4m3_decode>(m, "e4m3_decode", "e4m3fn bytes -> fp32");
    bind<float, uint8_t, e8m0_encode>(m, "e8m0_encode", "fp32 -> e8m0 bytes (as torch.float8_e8m0fnu)");
    bind<uint8_t, float, e8m0_decode>(m, "e8m0_decode", "e8m0 bytes e -> 2^(e-127) fp32 (255 -> NaN)");
    bind<float, uint8_t, e2m1_encode>(m, "e2m1_encode", "fp32 -> e2m1 codes 0..15 (RNE to even code, saturate ±6)");
    bind<uint8_t, float, e2m1_decode>(m, "e2m1_decode", "e2m1 codes 0..15 -> fp32");
}
