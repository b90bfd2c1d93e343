// Entry point of the megalite._C extension. Each concept lives in its own translation unit and
// registers itself here, so adding a helper never touches unrelated code.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_data_helpers(py::module_& m);     // defined in csrc/data_helpers.cpp
void register_indexed_builder(py::module_& m);  // defined in csrc/indexed_builder.cpp
void register_word_cache(py::module_& m);       // defined in csrc/word_cache.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "megalite C++ helpers (indexed dataset builder, sample and blending indices)";
  m.attr("__version__") = "0.1.0";
  register_data_helpers(m);
  register_indexed_builder(m);
  register_word_cache(m);
}
