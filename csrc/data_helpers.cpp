// Placeholder translation unit; the data-pipeline helpers (writer, sample index, blending) land here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_data_helpers(py::module_& m) { (void)m; }
