// The one binding file: check arguments, release the GIL, call the core, return arrays.
// No logic lives here; conversions of torch tensors happen in rom_fast/_arrays.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rom_fast/rom_fast.hpp"

namespace py = pybind11;
using rom_fast::index_t;

namespace {

enum class Want { F32, F64, Either };

// Refuses (never casts) arrays of the wrong dtype, rank or layout, naming the argument.
py::array checked(const py::handle& obj, const char* name, int ndim, Want want) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy array or torch CPU tensor, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  const bool f32 = a.dtype().is(py::dtype::of<float>());
  const bool f64 = a.dtype().is(py::dtype::of<double>());
  const bool ok = want == Want::F32 ? f32 : want == Want::F64 ? f64 : (f32 || f64);
  if (!ok) {
    const char* expected = want == Want::F32 ? "float32" : want == Want::F64 ? "float64"
                                                                             : "float32 or float64";
    throw py::type_error(std::string(name) + " must have dtype " + expected + ", got " +
                         std::string(py::str(a.dtype())) + " (convert it explicitly)");
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(a.ndim()) + "-D");
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) +
                          " must be C-contiguous (row-major); pass np.ascontiguousarray(...) "
                          "to make the copy explicit");
  }
  return a;
}

bool is_f32(const py::array& a) { return a.dtype().is(py::dtype::of<float>()); }

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> out(shape);
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

// A numpy array that owns `v`'s buffer (no copy): the vector lives until the array is freed.
template <class T>
py::array_t<T> adopt_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), owner);
}

rom_fast::EigenMethod parse_method(const std::string& m) {
  if (m == "auto") return rom_fast::EigenMethod::Auto;
  if (m == "syevd") return rom_fast::EigenMethod::Syevd;
  if (m == "syevr") return rom_fast::EigenMethod::Syevr;
  if (m == "stedc") return rom_fast::EigenMethod::Stedc;
  throw py::value_error("method must be 'auto', 'stedc', 'syevd' or 'syevr', got '" + m + "'");
}

py::dict factors_to_dict(const rom_fast::LowRankFactors& f) {
  py::dict d;
  d["w1"] = to_numpy(f.w1, {f.d_out, f.rank});
  d["w2"] = to_numpy(f.w2, {f.rank, f.d_in});
  d["b1"] = f.b1.empty() ? py::object(py::none()) : to_numpy(f.b1, {f.d_out});
  d["b2"] = f.b2.empty() ? py::object(py::none()) : to_numpy(f.b2, {f.rank});
  d["eigenvalues"] = to_numpy(f.eigenvalues, {f.rank});
  d["total_energy"] = f.total_energy;
  d["eigen_seconds"] = f.eigen_seconds;
  return d;
}

// Optional 1-D vector of exactly `n` values of the weight's dtype (or float64 for statistics).
const void* optional_vector(const py::object& obj, const char* name, index_t n, Want want,
                            py::array& keep) {
  if (obj.is_none()) return nullptr;
  keep = checked(obj, name, 1, want);
  if (keep.shape(0) != n) {
    throw py::value_error(std::string(name) + " must have length " + std::to_string(n) + ", got " +
                          std::to_string(keep.shape(0)));
  }
  return keep.data();
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rom_fast native core: Gram accumulation, eigensolvers, layer factorization";
  m.attr("__version__") = ROM_FAST_VERSION;
  // register_exception also translates a thrown rom_fast::LapackError into this type (a bare
  // py::exception only defines it, and the error reached Python as a plain RuntimeError).
  py::register_exception<rom_fast::LapackError>(m, "LapackError", PyExc_RuntimeError);

  m.def("set_num_threads", &rom_fast::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &rom_fast::get_num_threads);
  m.def("blas_threads_controlled", &rom_fast::blas_threads_controlled);

  py::class_<rom_fast::GramAccumulator> gram_accumulator(m, "GramAccumulator");
  gram_accumulator.attr("DEFAULT_BLOCK_ROWS") = rom_fast::GramAccumulator::kDefaultBlockRows;
  gram_accumulator
      .def(py::init([](index_t dim, const std::string& precision, index_t block_rows) {
             if (precision != "float32" && precision != "float64") {
               throw py::value_error("precision must be 'float32' or 'float64', got '" +
                                     precision + "'");
             }
             return new rom_fast::GramAccumulator(
                 dim, precision == "float32" ? rom_fast::GramPrecision::Float32
                                             : rom_fast::GramPrecision::Float64,
                 block_rows);
           }),
           py::arg("dim"), py::arg("precision") = "float64",
           py::arg("block_rows") = rom_fast::GramAccumulator::kDefaultBlockRows)
      .def_property_readonly("precision",
                             [](const rom_fast::GramAccumulator& self) {
                               return self.precision() == rom_fast::GramPrecision::Float32
                                          ? "float32"
                                          : "float64";
                             })
      .def_property_readonly("block_rows", &rom_fast::GramAccumulator::block_rows)
      .def(
          "update",
          [](rom_fast::GramAccumulator& self, const py::object& xo) {
            py::array x = checked(xo, "x", 2, Want::Either);
            if (x.shape(1) != self.dim()) {
              throw py::value_error("x must have " + std::to_string(self.dim()) +
                                    " columns, got " + std::to_string(x.shape(1)));
            }
            const index_t n = x.shape(0);
            py::gil_scoped_release release;
            if (is_f32(x)) {
              self.update(static_cast<const float*>(x.data()), n);
            } else {
              self.update(static_cast<const double*>(x.data()), n);
            }
          },
          py::arg("x"))
      .def(
          "merge",
          [](rom_fast::GramAccumulator& self, const rom_fast::GramAccumulator& other) {
            py::gil_scoped_release release;
            self.merge(other);
          },
          py::arg("other"))
      .def("reset", &rom_fast::GramAccumulator::reset)
      .def_property_readonly("dim", &rom_fast::GramAccumulator::dim)
      .def_property_readonly("count", &rom_fast::GramAccumulator::count)
      .def_property_readonly("gram",
                             [](const rom_fast::GramAccumulator& self) {
                               py::array_t<double> out({self.dim(), self.dim()});
                               double* p = out.mutable_data();
                               py::gil_scoped_release release;
                               self.gram(p);
                               return out;
                             })
      .def("take_gram",
           [](rom_fast::GramAccumulator& self) {
             std::vector<double> g;
             {
               py::gil_scoped_release release;
               g = self.take_gram();
             }
             return adopt_numpy(std::move(g), {self.dim(), self.dim()});
           })
      .def_property_readonly("taken", &rom_fast::GramAccumulator::taken)
      .def_property_readonly("column_sum",
                             [](const rom_fast::GramAccumulator& self) {
                               return to_numpy(self.column_sum(), {self.dim()});
                             })
      .def("centered_gram", [](const rom_fast::GramAccumulator& self) {
        py::array_t<double> out({self.dim(), self.dim()});
        double* p = out.mutable_data();
        py::gil_scoped_release release;
        self.centered_gram(p);
        return out;
      });

  m.def(
      "top_eigenpairs",
      [](const py::object& so, index_t r, const std::string& method) {
        py::array s = checked(so, "sym", 2, Want::F64);
        const index_t d = s.shape(0);
        if (s.shape(1) != d) throw py::value_error("sym must be square");
        if (r < 1 || r > d) {
          throw py::value_error("r must be in [1, " + std::to_string(d) + "], got " +
                                std::to_string(r));
        }
        const auto meth = parse_method(method);
        py::array_t<double> values({r}), vectors({r, d});
        double *pv = values.mutable_data(), *pw = vectors.mutable_data();
        const double* a = static_cast<const double*>(s.data());
        {
          py::gil_scoped_release release;
          rom_fast::top_eigenpairs(a, d, r, pv, pw, meth);
        }
        return py::make_tuple(values, vectors);
      },
      py::arg("sym"), py::arg("r"), py::arg("method") = "auto");

  m.def(
      "eigenvalues",
      [](const py::object& so) {
        py::array s = checked(so, "sym", 2, Want::F64);
        const index_t d = s.shape(0);
        if (s.shape(1) != d) throw py::value_error("sym must be square");
        const double* a = static_cast<const double*>(s.data());
        std::vector<double> w;
        {
          py::gil_scoped_release release;
          w = rom_fast::eigenvalues(a, d);
        }
        return to_numpy(w, {d});
      },
      py::arg("sym"));

  py::class_<rom_fast::InputFactor>(m, "InputFactor")
      .def(py::init([](const py::object& go, const py::object& colsum, double count, bool centered,
                       bool with_bias) {
             py::array g = checked(go, "gram", 2, Want::F64);
             const index_t d = g.shape(0);
             if (g.shape(1) != d) throw py::value_error("gram must be square");
             py::array keep;
             const auto* s = static_cast<const double*>(
                 optional_vector(colsum, "colsum", d, Want::F64, keep));
             const double* gp = static_cast<const double*>(g.data());
             py::gil_scoped_release release;
             return new rom_fast::InputFactor(
                 gp, d, s, count,
                 centered ? rom_fast::Centering::Centered : rom_fast::Centering::Uncentered,
                 with_bias);
           }),
           py::arg("gram"), py::arg("colsum") = py::none(), py::arg("count") = 0.0,
           py::arg("centered") = false, py::arg("with_bias") = false)
      .def_property_readonly("dim", &rom_fast::InputFactor::dim)
      .def_property_readonly("rank", &rom_fast::InputFactor::rank)
      .def_property_readonly("centered",
                             [](const rom_fast::InputFactor& f) {
                               return f.centering() == rom_fast::Centering::Centered;
                             })
      .def_property_readonly("with_bias", &rom_fast::InputFactor::with_bias);

  m.def(
      "factorize_layer",
      [](const py::object& wo, const rom_fast::InputFactor& factor, index_t rank,
         const py::object& bias, const std::string& method) {
        py::array w = checked(wo, "weight", 2, Want::Either);
        const index_t d_out = w.shape(0), d_in = w.shape(1);
        py::array keep;
        const void* b = optional_vector(bias, "bias", d_out, is_f32(w) ? Want::F32 : Want::F64, keep);
        const auto meth = parse_method(method);
        rom_fast::LowRankFactors f;
        {
          py::gil_scoped_release release;
          f = is_f32(w) ? rom_fast::factorize_layer(static_cast<const float*>(w.data()), d_out,
                                                    d_in, static_cast<const float*>(b), factor,
                                                    rank, meth)
                        : rom_fast::factorize_layer(static_cast<const double*>(w.data()), d_out,
                                                    d_in, static_cast<const double*>(b), factor,
                                                    rank, meth);
        }
        return factors_to_dict(f);
      },
      py::arg("weight"), py::arg("factor"), py::arg("rank"), py::arg("bias") = py::none(),
      py::arg("method") = "auto");

  m.def(
      "factorize_layer_output_gram",
      [](const py::object& wo, const py::object& go, index_t rank, const py::object& bias,
         const py::object& colsum, double count, bool centered, const std::string& method) {
        py::array w = checked(wo, "weight", 2, Want::Either);
        const index_t d_out = w.shape(0), d_in = w.shape(1);
        py::array g = checked(go, "gram_out", 2, Want::F64);
        if (g.shape(0) != d_out || g.shape(1) != d_out) {
          throw py::value_error("gram_out must be d_out x d_out = " + std::to_string(d_out) +
                                " x " + std::to_string(d_out));
        }
        py::array keep_b, keep_s;
        const void* b =
            optional_vector(bias, "bias", d_out, is_f32(w) ? Want::F32 : Want::F64, keep_b);
        const auto* s =
            static_cast<const double*>(optional_vector(colsum, "colsum_out", d_out, Want::F64, keep_s));
        const auto meth = parse_method(method);
        const auto cent = centered ? rom_fast::Centering::Centered : rom_fast::Centering::Uncentered;
        const double* gp = static_cast<const double*>(g.data());
        rom_fast::LowRankFactors f;
        {
          py::gil_scoped_release release;
          f = is_f32(w) ? rom_fast::factorize_layer_output_gram(
                              static_cast<const float*>(w.data()), d_out, d_in,
                              static_cast<const float*>(b), gp, s, count, cent, rank, meth)
                        : rom_fast::factorize_layer_output_gram(
                              static_cast<const double*>(w.data()), d_out, d_in,
                              static_cast<const double*>(b), gp, s, count, cent, rank, meth);
        }
        return factors_to_dict(f);
      },
      py::arg("weight"), py::arg("gram_out"), py::arg("rank"), py::arg("bias") = py::none(),
      py::arg("colsum_out") = py::none(), py::arg("count") = 0.0, py::arg("centered") = false,
      py::arg("method") = "auto");

  m.def(
      "output_spectrum",
      [](const py::object& wo, const rom_fast::InputFactor& factor, const py::object& bias) {
        py::array w = checked(wo, "weight", 2, Want::Either);
        const index_t d_out = w.shape(0), d_in = w.shape(1);
        py::array keep;
        const void* b = optional_vector(bias, "bias", d_out, is_f32(w) ? Want::F32 : Want::F64, keep);
        std::vector<double> v;
        {
          py::gil_scoped_release release;
          v = is_f32(w) ? rom_fast::output_spectrum(static_cast<const float*>(w.data()), d_out, d_in,
                                                    static_cast<const float*>(b), factor)
                        : rom_fast::output_spectrum(static_cast<const double*>(w.data()), d_out, d_in,
                                                    static_cast<const double*>(b), factor);
        }
        return to_numpy(v, {static_cast<py::ssize_t>(v.size())});
      },
      py::arg("weight"), py::arg("factor"), py::arg("bias") = py::none());

  m.def(
      "lowrank_apply",
      [](const py::object& xo, const py::object& w1o, const py::object& w2o, const py::object& b1o) {
        py::array x = checked(xo, "x", 2, Want::Either);
        const Want same = is_f32(x) ? Want::F32 : Want::F64;
        py::array w1 = checked(w1o, "w1", 2, same), w2 = checked(w2o, "w2", 2, same);
        const index_t n = x.shape(0), d_in = x.shape(1), d_out = w1.shape(0), r = w1.shape(1);
        if (w2.shape(0) != r || w2.shape(1) != d_in) {
          throw py::value_error("w2 must be r x d_in = " + std::to_string(r) + " x " +
                                std::to_string(d_in));
        }
        py::array keep;
        const void* b1 = optional_vector(b1o, "b1", d_out, same, keep);
        py::array y = is_f32(x) ? py::array(py::array_t<float>({n, d_out}))
                                : py::array(py::array_t<double>({n, d_out}));
        void* py_ = y.mutable_data();
        py::gil_scoped_release release;
        if (same == Want::F32) {
          std::vector<float> scratch(static_cast<std::size_t>(n * r));
          rom_fast::lowrank_apply(static_cast<const float*>(x.data()), n, d_in,
                                  static_cast<const float*>(w1.data()),
                                  static_cast<const float*>(w2.data()), d_out, r,
                                  static_cast<const float*>(b1), static_cast<float*>(py_),
                                  scratch.data());
        } else {
          std::vector<double> scratch(static_cast<std::size_t>(n * r));
          rom_fast::lowrank_apply(static_cast<const double*>(x.data()), n, d_in,
                                  static_cast<const double*>(w1.data()),
                                  static_cast<const double*>(w2.data()), d_out, r,
                                  static_cast<const double*>(b1), static_cast<double*>(py_),
                                  scratch.data());
        }
        return y;
      },
      py::arg("x"), py::arg("w1"), py::arg("w2"), py::arg("b1") = py::none());

  // -- dense-anchored targets (rom_fast/anchor.hpp) ---------------------------------------
  py::class_<rom_fast::CrossGramAccumulator>(m, "CrossGramAccumulator")
      .def(py::init<index_t, index_t>(), py::arg("dim_dense"), py::arg("dim_comp"))
      .def(
          "update",
          [](rom_fast::CrossGramAccumulator& self, const py::object& xdo, const py::object& xco) {
            py::array xd = checked(xdo, "x_dense", 2, Want::Either);
            py::array xc = checked(xco, "x_comp", 2, Want::Either);
            if (xd.shape(1) != self.dim_dense() || xc.shape(1) != self.dim_comp()) {
              throw py::value_error("x_dense and x_comp must have " +
                                    std::to_string(self.dim_dense()) + " and " +
                                    std::to_string(self.dim_comp()) + " columns, got " +
                                    std::to_string(xd.shape(1)) + " and " +
                                    std::to_string(xc.shape(1)));
            }
            if (xd.shape(0) != xc.shape(0)) {
              throw py::value_error("x_dense and x_comp must have the same rows (tokens), got " +
                                    std::to_string(xd.shape(0)) + " and " +
                                    std::to_string(xc.shape(0)));
            }
            if (is_f32(xd) != is_f32(xc)) {
              throw py::type_error("x_dense and x_comp must have the same dtype");
            }
            const index_t n = xd.shape(0);
            py::gil_scoped_release release;
            if (is_f32(xd)) {
              self.update(static_cast<const float*>(xd.data()), static_cast<const float*>(xc.data()), n);
            } else {
              self.update(static_cast<const double*>(xd.data()), static_cast<const double*>(xc.data()), n);
            }
          },
          py::arg("x_dense"), py::arg("x_comp"))
      .def(
          "merge",
          [](rom_fast::CrossGramAccumulator& self, const rom_fast::CrossGramAccumulator& other) {
            py::gil_scoped_release release;
            self.merge(other);
          },
          py::arg("other"))
      .def_property_readonly("dim_dense", &rom_fast::CrossGramAccumulator::dim_dense)
      .def_property_readonly("dim_comp", &rom_fast::CrossGramAccumulator::dim_comp)
      .def_property_readonly("count", &rom_fast::CrossGramAccumulator::count)
      .def_property_readonly("cross",
                             [](const rom_fast::CrossGramAccumulator& self) {
                               py::array_t<double> out({self.dim_dense(), self.dim_comp()});
                               double* p = out.mutable_data();
                               py::gil_scoped_release release;
                               self.cross(p);
                               return out;
                             })
      .def_property_readonly("dense_column_sum", [](const rom_fast::CrossGramAccumulator& self) {
        return to_numpy(self.dense_column_sum(), {self.dim_dense()});
      });

  py::class_<rom_fast::AnchorCorrection>(m, "AnchorCorrection")
      .def(py::init([](const py::object& go, const py::object& so, const py::object& co,
                       const py::object& sdo, double count, double ridge, bool with_bias) {
             py::array g = checked(go, "gram", 2, Want::F64);
             py::array c = checked(co, "cross", 2, Want::F64);
             const index_t d = g.shape(0);
             if (g.shape(1) != d || c.shape(0) != d || c.shape(1) != d) {
               throw py::value_error("gram and cross must both be d x d, got " +
                                     std::to_string(g.shape(0)) + " x " + std::to_string(g.shape(1)) +
                                     " and " + std::to_string(c.shape(0)) + " x " +
                                     std::to_string(c.shape(1)));
             }
             py::array ks, kd;
             const void* s = optional_vector(so, "comp_sum", d, Want::F64, ks);
             const void* sd = optional_vector(sdo, "dense_sum", d, Want::F64, kd);
             if (with_bias && (s == nullptr || sd == nullptr)) {
               throw py::value_error("with_bias needs comp_sum and dense_sum");
             }
             py::gil_scoped_release release;
             return new rom_fast::AnchorCorrection(
                 d, static_cast<const double*>(g.data()), static_cast<const double*>(s),
                 static_cast<const double*>(c.data()), static_cast<const double*>(sd), count, ridge,
                 with_bias);
           }),
           py::arg("gram"), py::arg("comp_sum"), py::arg("cross"), py::arg("dense_sum"),
           py::arg("count"), py::arg("ridge"), py::arg("with_bias") = false)
      .def_property_readonly("dim", &rom_fast::AnchorCorrection::dim)
      .def_property_readonly("with_bias", &rom_fast::AnchorCorrection::with_bias)
      .def_property_readonly("ridge_lambda", &rom_fast::AnchorCorrection::lambda)
      .def(
          "apply",
          [](const rom_fast::AnchorCorrection& self, const py::object& wo, const py::object& bo,
             double alpha) {
            py::array w = checked(wo, "weight", 2, Want::Either);
            if (w.shape(1) != self.dim()) {
              throw py::value_error("weight must have " + std::to_string(self.dim()) +
                                    " columns (the statistics' dim), got " + std::to_string(w.shape(1)));
            }
            const index_t d_out = w.shape(0);
            if (d_out < 1) throw py::value_error("weight must have at least one row");
            py::array keep;
            const void* b = optional_vector(bo, "bias", d_out, is_f32(w) ? Want::F32 : Want::F64, keep);
            if (b != nullptr && !self.with_bias()) {
              throw py::value_error("a bias needs an AnchorCorrection built with with_bias=True");
            }
            py::array_t<double> w_eff({d_out, self.dim()});
            py::object b_out = py::none();
            double* bp = nullptr;
            if (self.with_bias()) {
              py::array_t<double> bb(d_out);
              bp = bb.mutable_data();
              b_out = bb;
            }
            double* wp = w_eff.mutable_data();
            {
              py::gil_scoped_release release;
              if (is_f32(w)) {
                self.apply(static_cast<const float*>(w.data()), d_out, static_cast<const float*>(b),
                           alpha, wp, bp);
              } else {
                self.apply(static_cast<const double*>(w.data()), d_out, static_cast<const double*>(b),
                           alpha, wp, bp);
              }
            }
            return py::make_tuple(w_eff, b_out);
          },
          py::arg("weight"), py::arg("bias"), py::arg("alpha"));

  // -- structured input pruning (rom_fast/neurons.hpp) ------------------------------------
  m.def(
      "select_inputs",
      [](const py::object& wo, const py::object& go, index_t keep, double ridge, index_t block,
         std::optional<index_t> curve_to, bool overwrite_gram) {
        py::array w = checked(wo, "weight", 2, Want::Either);
        py::array g = checked(go, "gram", 2, Want::F64);
        if (overwrite_gram && !g.writeable()) {
          throw py::value_error("gram must be writable to be overwritten (overwrite_gram=True); "
                                "pass overwrite_gram=False to work on a copy");
        }
        const index_t d = w.shape(0), n = w.shape(1);
        if (g.shape(0) != g.shape(1)) {
          throw py::value_error("gram must be square, got " + std::to_string(g.shape(0)) + " x " +
                                std::to_string(g.shape(1)));
        }
        if (g.shape(0) != n) {
          throw py::value_error("gram must be n x n with n = " + std::to_string(n) +
                                " (the weight's columns), got " + std::to_string(g.shape(0)) +
                                " x " + std::to_string(g.shape(1)));
        }
        rom_fast::SelectionOptions options;
        options.ridge = ridge;
        options.block = block;
        options.curve_to = curve_to;
        double* gp = overwrite_gram ? static_cast<double*>(g.mutable_data()) : nullptr;
        const double* gc = static_cast<const double*>(g.data());
        const bool f32 = is_f32(w);
        rom_fast::InputSelection s;
        {
          py::gil_scoped_release release;
          if (overwrite_gram) {
            s = f32 ? rom_fast::select_inputs_in_place(static_cast<const float*>(w.data()), d, n,
                                                       gp, keep, options)
                    : rom_fast::select_inputs_in_place(static_cast<const double*>(w.data()), d, n,
                                                       gp, keep, options);
          } else {
            s = f32 ? rom_fast::select_inputs(static_cast<const float*>(w.data()), d, n, gc, keep,
                                              options)
                    : rom_fast::select_inputs(static_cast<const double*>(w.data()), d, n, gc, keep,
                                              options);
          }
        }
        const auto len = [](const auto& v) { return static_cast<py::ssize_t>(v.size()); };
        py::dict out;
        out["kept"] = to_numpy(s.kept, {len(s.kept)});
        out["removed"] = to_numpy(s.removed, {len(s.removed)});
        out["curve_kept"] = to_numpy(s.curve_kept, {len(s.curve_kept)});
        out["curve_loss"] = to_numpy(s.curve_loss, {len(s.curve_loss)});
        out["weight"] = to_numpy(s.weight, {d, len(s.kept)});
        out["total_energy"] = s.total_energy;
        out["lambda"] = s.lambda;
        return out;
      },
      py::arg("weight"), py::arg("gram"), py::arg("keep"), py::arg("ridge"), py::arg("block"),
      py::arg("curve_to") = py::none(), py::arg("overwrite_gram") = false);
}
