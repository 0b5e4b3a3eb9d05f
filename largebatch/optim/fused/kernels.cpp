// One LARS or LAMB step over all the tensors of a parameter group, on the CPU, for
// largebatch.optim.fused (which compiles this file at first use and calls it through ctypes).
//
// The step is memory-bound: its time is the number of passes over weight-sized arrays. A trust ratio
// needs two whole-tensor norms before any element can be updated, so every tensor takes two passes:
// one that accumulates the squared norms (LAMB: after updating its moments, which the update's norm
// needs), then the update. The group's tensors are taken in chunks of consecutive tensors of about
// `chunk` elements per thread (a larger tensor is a chunk of its own); a chunk's elements are split
// evenly between the threads, whatever the tensor boundaries, and each thread makes both passes over
// the same share, separated by one barrier. A thread's share of a chunk that fits in its cache is
// therefore read from memory once, and small tensors cost no parallel region or barrier of their own.
// Norms are summed in T within short blocks and in double across them.
//
// Semantics: the docstrings of largebatch.optim.lars.LARS and largebatch.optim.lamb.LAMB.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// The [begin, end) of a chunk's elements that thread t of nt takes, at multiples of 64 elements so
// that two threads never write the same cache line.
void share(int64_t total, int t, int nt, int64_t* begin, int64_t* end) {
    auto cut = [&](int i) { return std::min(total, (total * i / nt + 63) / 64 * 64); };
    *begin = cut(t);
    *end = t == nt - 1 ? total : cut(t + 1);
}

// Runs body(tensor, from, to) for each tensor of [first, last) that overlaps [begin, end), an
// interval of the group's elements, with [from, to) the overlap within the tensor; offsets are the
// tensors' first elements in the group (offsets[i + 1] the end of tensor i).
template <typename Body>
void over_share(int64_t first, int64_t last, const int64_t* offsets, int64_t begin, int64_t end, Body body) {
    for (int64_t i = first; i < last; ++i) {
        const int64_t from = std::max(begin, offsets[i]), to = std::min(end, offsets[i + 1]);
        if (from < to) body(i, from - offsets[i], to - offsets[i]);
    }
}

// The two-pass scheme of the file comment. norms(i, from, to, sums) adds tensor i's two squared-norm
// terms over [from, to) to sums[0..1]; factor(ww, uu) is a tensor's factor (LARS's local lr, LAMB's
// trust ratio) from its squared norms; update(i, from, to, factor) updates [from, to) of tensor i.
// With two_pass false there are no norms and each tensor gets factor(0, 0) in its one pass. Writes
// every tensor's factor to factors_out.
template <typename Norms, typename Factor, typename Update>
void group_step(int64_t n, const int64_t* numel, int64_t chunk, int threads, bool two_pass, Norms norms,
                Factor factor, Update update, double* factors_out) {
    std::vector<int64_t> offsets(n + 1, 0), chunk_starts;
    for (int64_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + numel[i];
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, offsets[n] / 32768)));
    for (int64_t i = 0; i < n; ++i) {
        if (i == 0 || offsets[i + 1] - offsets[chunk_starts.back()] > chunk * nt) chunk_starts.push_back(i);
    }
    chunk_starts.push_back(n);
    std::vector<double> sums(static_cast<size_t>(nt) * n * 2, 0.0);  // [thread][tensor][2]
    auto factor_of = [&](int64_t i) {
        double ww = 0.0, uu = 0.0;
        for (int t = 0; t < nt; ++t) {
            ww += sums[(t * n + i) * 2];
            uu += sums[(t * n + i) * 2 + 1];
        }
        return factor(ww, uu);
    };

#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num();
        for (size_t c = 0; c + 1 < chunk_starts.size(); ++c) {
            const int64_t first = chunk_starts[c], last = chunk_starts[c + 1];
            const int64_t base = offsets[first];
            int64_t begin, end;
            share(offsets[last] - base, t, nt, &begin, &end);
            begin += base;
            end += base;
            if (two_pass) {
                over_share(first, last, offsets.data(), begin, end, [&](int64_t i, int64_t from, int64_t to) {
                    norms(i, from, to, &sums[(t * n + i) * 2]);
                });
#pragma omp barrier
            }
            over_share(first, last, offsets.data(), begin, end, [&](int64_t i, int64_t from, int64_t to) {
                update(i, from, to, factor_of(i));
            });
        }
    }
    for (int64_t i = 0; i < n; ++i) factors_out[i] = factor_of(i);
}

// Adds to sums[0..1] the sums over k in [from, to) of the two squares that term(k, a, b) adds to a
// and b: in T within blocks of 256 elements, a vectorised loop whose lanes each add 16 or 32 terms,
// and in double across blocks. Summing every term in double costs more than the memory traffic.
template <typename T, typename Term>
void sum_squares(int64_t from, int64_t to, double* sums, Term term) {
    double aa = 0.0, bb = 0.0;
    for (int64_t k0 = from; k0 < to; k0 += 256) {
        const int64_t k1 = std::min(to, k0 + 256);
        T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
        for (int64_t k = k0; k < k1; ++k) term(k, a, b);
        aa += a;
        bb += b;
    }
    sums[0] += aa;
    sums[1] += bb;
}

// LARS: local = eta |w| / (|g| + wd |w| + eps), d = g + wd w, v <- m v + lr local d, w <- w - v
// (Nesterov: w <- w - (m v + lr local d)); without momentum w <- w - lr local d.
template <typename T>
void lars_step(int64_t n, T** p, T** g, T** buf, const int64_t* numel, double lr, double momentum,
               double weight_decay, double trust_coefficient, double eps, bool nesterov, bool clip, bool trust,
               int64_t chunk, int threads, double* local_out) {
    const T wd = static_cast<T>(weight_decay), m = static_cast<T>(momentum);
    auto norms = [&](int64_t i, int64_t from, int64_t to, double* sums) {
        const T* __restrict w = p[i];
        const T* __restrict gi = g[i];
        sum_squares<T>(from, to, sums, [&](int64_t k, T& ww, T& gg) {
            ww += w[k] * w[k];
            gg += gi[k] * gi[k];
        });
    };
    auto local = [&](double ww, double gg) {
        const double w_norm = std::sqrt(ww), g_norm = std::sqrt(gg);
        if (!trust || !(w_norm > 0 && g_norm > 0)) return 1.0;
        const double ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps);
        return clip ? (lr > 0 ? std::min(ratio / lr, 1.0) : 1.0) : ratio;
    };
    auto update = [&](int64_t i, int64_t from, int64_t to, double factor) {
        T* __restrict w = p[i];
        const T* __restrict d_g = g[i];
        T* __restrict v = buf ? buf[i] : nullptr;
        const T rate = static_cast<T>(lr * factor);
        if (!v) {
#pragma omp simd
            for (int64_t k = from; k < to; ++k) w[k] -= rate * (d_g[k] + wd * w[k]);
        } else if (nesterov) {
#pragma omp simd
            for (int64_t k = from; k < to; ++k) {
                const T step = rate * (d_g[k] + wd * w[k]);
                const T vk = m * v[k] + step;
                v[k] = vk;
                w[k] -= m * vk + step;
            }
        } else {
#pragma omp simd
            for (int64_t k = from; k < to; ++k) {
                const T vk = m * v[k] + rate * (d_g[k] + wd * w[k]);
                v[k] = vk;
                w[k] -= vk;
            }
        }
    };
    group_step(n, numel, chunk, threads, trust, norms, local, update, local_out);
}

// LAMB: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2, u = c1 m / (sqrt(v) + c2) + wd w with the
// tensor's c1 = sqrt(bc2) / bc1 and c2 = eps sqrt(bc2), r = |w| / |u| (clipped), w <- w - lr r u.
// The first pass updates the moments and sums |w|^2 and |u|^2; the second recomputes u from them.
template <typename T>
void lamb_step(int64_t n, T** p, T** g, T** exp_avg, T** exp_avg_sq, const int64_t* numel, const double* c1,
               const double* c2, double lr, double beta1, double beta2, double weight_decay, double trust_clip,
               bool trust, int64_t chunk, int threads, double* ratio_out) {
    const T b1 = static_cast<T>(beta1), b2 = static_cast<T>(beta2), wd = static_cast<T>(weight_decay);
    const T one_b1 = static_cast<T>(1 - beta1), one_b2 = static_cast<T>(1 - beta2);
    auto norms = [&](int64_t i, int64_t from, int64_t to, double* sums) {
        const T* __restrict w = p[i];
        const T* __restrict gi = g[i];
        T* __restrict mi = exp_avg[i];
        T* __restrict vi = exp_avg_sq[i];
        const T a = static_cast<T>(c1[i]), b = static_cast<T>(c2[i]);
        sum_squares<T>(from, to, sums, [&](int64_t k, T& ww, T& uu) {
            const T mk = b1 * mi[k] + one_b1 * gi[k];
            const T vk = b2 * vi[k] + one_b2 * gi[k] * gi[k];
            mi[k] = mk;
            vi[k] = vk;
            const T u = a * mk / (std::sqrt(vk) + b) + wd * w[k];
            ww += w[k] * w[k];
            uu += u * u;
        });
    };
    auto ratio = [&](double ww, double uu) {
        if (!trust) return 1.0;
        const double w_norm = std::sqrt(ww), u_norm = std::sqrt(uu);
        const double r = (w_norm > 0 && u_norm > 0) ? w_norm / u_norm : 1.0;
        return trust_clip > 0 ? std::min(r, trust_clip) : r;
    };
    auto update = [&](int64_t i, int64_t from, int64_t to, double factor) {
        T* __restrict w = p[i];
        const T* __restrict gi = g[i];
        T* __restrict mi = exp_avg[i];
        T* __restrict vi = exp_avg_sq[i];
        const T a = static_cast<T>(c1[i]), b = static_cast<T>(c2[i]);
        const T rate = static_cast<T>(lr * factor);
        if (trust) {  // the first pass updated the moments
#pragma omp simd
            for (int64_t k = from; k < to; ++k) w[k] -= rate * (a * mi[k] / (std::sqrt(vi[k]) + b) + wd * w[k]);
        } else {  // one pass
#pragma omp simd
            for (int64_t k = from; k < to; ++k) {
                const T mk = b1 * mi[k] + one_b1 * gi[k];
                const T vk = b2 * vi[k] + one_b2 * gi[k] * gi[k];
                mi[k] = mk;
                vi[k] = vk;
                w[k] -= rate * (a * mk / (std::sqrt(vk) + b) + wd * w[k]);
            }
        }
    };
    group_step(n, numel, chunk, threads, trust, norms, ratio, update, ratio_out);
}

}  // namespace

extern "C" {

#define LB_LARS(SUFFIX, T)                                                                                        \
    void lb_lars_step_##SUFFIX(int64_t n, T** p, T** g, T** buf, const int64_t* numel, double lr, double momentum, \
                               double weight_decay, double trust_coefficient, double eps, int nesterov, int clip,  \
                               int trust, int64_t chunk, int threads, double* local_out) {                        \
        lars_step<T>(n, p, g, buf, numel, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, clip,     \
                     trust, chunk, threads, local_out);                                                           \
    }

#define LB_LAMB(SUFFIX, T)                                                                                       \
    void lb_lamb_step_##SUFFIX(int64_t n, T** p, T** g, T** exp_avg, T** exp_avg_sq, const int64_t* numel,       \
                               const double* c1, const double* c2, double lr, double beta1, double beta2,        \
                               double weight_decay, double trust_clip, int trust, int64_t chunk, int threads,    \
                               double* ratio_out) {                                                              \
        lamb_step<T>(n, p, g, exp_avg, exp_avg_sq, numel, c1, c2, lr, beta1, beta2, weight_decay, trust_clip,    \
                     trust, chunk, threads, ratio_out);                                                          \
    }

LB_LARS(f32, float)
LB_LARS(f64, double)
LB_LAMB(f32, float)
LB_LAMB(f64, double)

}  // extern "C"
