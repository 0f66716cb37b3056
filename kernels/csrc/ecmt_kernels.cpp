// Native CPU kernels of the ECMT toolkit, built once per machine by native_kernels.py
// (c++ -O3 -march=native -fopenmp, cached on disk) and called through ctypes:
//   ecmt_mt_steps        K steps of the multi-threshold neuron (ECMT_SPEC 4);
//   ecmt_qkv_mt_steps    the q, k and v neurons of a fused qkv output in one pass;
//   ecmt_ec_gelu_steps   K expectation-compensated GELU steps (ECMT_SPEC 5);
//   ecmt_ec_softmax_steps     K EC softmax steps over rows;
//   ecmt_ec_layer_norm_steps  K EC LayerNorm steps over rows;
//   ecmt_running_sums, ecmt_scaled_differences  the bookkeeping of K EC product steps;
//   ecmt_tail_quantiles  exact tail order statistics for threshold calibration (ECMT_SPEC 3).
// The step kernels take all K steps of a chunk at once (time-major [K, ...] inputs) and loop over
// t inside: the state (membrane, running sum, last total) of a tile of elements stays in
// registers or L1 for the K steps, is read once at the start (not at all on a batch's first
// chunk: it starts at zero) and written once at the end (not at all on a batch's last chunk).
// They read the input and write the output, nothing else. The tests hold them to plain
// reference implementations.
//
// Tail order statistics: one pass over the tensor's memory (any strides) gathers the elements
// beyond two bounds taken from a sample (>= hb, <= lb) and counts NaNs; the statistics are then
// selected among the gathered elements. The counts prove the bounds right; when they do not (an
// unlucky sample, a constant sample) every element is copied and selected from, so the result is
// always the exact k-th smallest. The pass runs on torch's OpenMP threads (the same pool as the
// forward pass's matrix products: no second set of threads competing for the cores).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxDims = 25;
constexpr int64_t kChunk = 4096;  // elements scanned between two capacity checks

struct Layout {
    int ndim = 0;
    int64_t sizes[kMaxDims];
    int64_t strides[kMaxDims];
};

// The same elements in the fewest loops: size-1 dimensions dropped, dimensions ordered by stride
// (order statistics do not depend on the order), neighbours merged where memory is contiguous.
Layout coalesce(int ndim, const int64_t* sizes, const int64_t* strides) {
    Layout l;
    for (int d = 0; d < ndim; ++d) {
        if (sizes[d] == 1) continue;
        l.sizes[l.ndim] = sizes[d];
        l.strides[l.ndim] = strides[d];
        ++l.ndim;
    }
    for (int i = 1; i < l.ndim; ++i) {  // insertion sort, strides descending
        for (int j = i; j > 0 && l.strides[j - 1] < l.strides[j]; --j) {
            std::swap(l.strides[j - 1], l.strides[j]);
            std::swap(l.sizes[j - 1], l.sizes[j]);
        }
    }
    int out = 0;
    for (int d = 1; d < l.ndim; ++d) {
        if (l.strides[out] == l.strides[d] * l.sizes[d]) {
            l.sizes[out] *= l.sizes[d];
            l.strides[out] = l.strides[d];
        } else {
            ++out;
            l.sizes[out] = l.sizes[d];
            l.strides[out] = l.strides[d];
        }
    }
    if (l.ndim > 0) l.ndim = out + 1;
    if (l.ndim == 0) {  // a single element
        l.ndim = 1;
        l.sizes[0] = 1;
        l.strides[0] = 1;
    }
    return l;
}

// Growable buffer without zero-filling what it never reads.
struct Buffer {
    std::vector<float> data;
    int64_t size = 0;
    void reserve_more(int64_t extra) {
        if (size + extra > static_cast<int64_t>(data.size()))
            data.resize(std::max<int64_t>(2 * data.size(), size + extra + kChunk));
    }
};

struct Scan {
    float hb, lb;
    Buffer upper, lower;
    int64_t nans = 0;

    Scan(float high, float low) : hb(high), lb(low) {}

    // n contiguous elements; the buffers have room for n more each.
    void contiguous(const float* p, int64_t n) {
        int64_t i = 0;
#if defined(__AVX512F__)
        float* up = upper.data.data();
        float* lo = lower.data.data();
        int64_t a = upper.size, b = lower.size;
        const __m512 vh = _mm512_set1_ps(hb), vl = _mm512_set1_ps(lb);
        int64_t nan_count = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(p + i);
            const __mmask16 mu = _mm512_cmp_ps_mask(v, vh, _CMP_GE_OQ);
            const __mmask16 ml = _mm512_cmp_ps_mask(v, vl, _CMP_LE_OQ);
            const __mmask16 mn = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            _mm512_storeu_ps(up + a, _mm512_maskz_compress_ps(mu, v));
            a += __builtin_popcount(mu);
            _mm512_storeu_ps(lo + b, _mm512_maskz_compress_ps(ml, v));
            b += __builtin_popcount(ml);
            nan_count += __builtin_popcount(mn);
        }
        nans += nan_count;
        upper.size = a;
        lower.size = b;
#endif
        strided(p + i, n - i, 1);  // the rest (all of it without AVX-512)
    }

    // n elements `stride` apart; the buffers have room for n more each.
    void strided(const float* p, int64_t n, int64_t stride) {
        float* up = upper.data.data();
        float* lo = lower.data.data();
        int64_t a = upper.size, b = lower.size;
        for (int64_t i = 0; i < n; ++i) {  // branch-free: write always, advance when it belongs
            const float v = p[i * stride];
            up[a] = v;
            a += v >= hb;
            lo[b] = v;
            b += v <= lb;
            nans += v != v;
        }
        upper.size = a;
        lower.size = b;
    }

    void absorb(const Scan& other) {
        upper.reserve_more(other.upper.size);
        std::copy_n(other.upper.data.data(), other.upper.size, upper.data.data() + upper.size);
        upper.size += other.upper.size;
        lower.reserve_more(other.lower.size);
        std::copy_n(other.lower.data.data(), other.lower.size, lower.data.data() + lower.size);
        lower.size += other.lower.size;
        nans += other.nans;
    }
};

// Scan every element of the tensor into result, on up to `threads` threads (each gathers into a
// buffer of its own; the buffers are joined at the end: the order of the gathered elements does
// not matter to the selection). Work items: blocks of rows of the innermost dimension, or
// chunks of one long row, of about kChunk elements each.
void parallel_scan(const float* data, const Layout& l, Scan& result, int threads) {
    const int inner_dim = l.ndim - 1;
    const int64_t inner = l.sizes[inner_dim], stride = l.strides[inner_dim];
    int64_t outer = 1;
    for (int d = 0; d < inner_dim; ++d) outer *= l.sizes[d];
    const int64_t chunks = (inner + kChunk - 1) / kChunk;
    const int64_t rows_per_item = inner >= kChunk ? 1 : std::max<int64_t>(1, kChunk / inner);
    const int64_t items = (outer + rows_per_item - 1) / rows_per_item * chunks;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
    {
        Scan local(result.hb, result.lb);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t start = item % chunks * kChunk, len = std::min(kChunk, inner - start);
            const int64_t first = item / chunks * rows_per_item;
            const int64_t last = std::min(outer, first + rows_per_item);
            int64_t index[kMaxDims] = {0};
            int64_t offset = 0;
            for (int64_t rest = first, d = inner_dim - 1; d >= 0; --d) {  // row `first`'s position
                index[d] = rest % l.sizes[d];
                offset += index[d] * l.strides[d];
                rest /= l.sizes[d];
            }
            for (int64_t r = first; r < last; ++r) {
                local.upper.reserve_more(len + 16);
                local.lower.reserve_more(len + 16);
                if (stride == 1) local.contiguous(data + offset + start, len);
                else local.strided(data + offset + start * stride, len, stride);
                for (int d = inner_dim - 1; d >= 0; --d) {  // odometer over the outer dimensions
                    offset += l.strides[d];
                    if (++index[d] < l.sizes[d]) break;
                    offset -= l.strides[d] * l.sizes[d];
                    index[d] = 0;
                }
            }
        }
#pragma omp critical(ecmt_scan_join)
        result.absorb(local);
    }
}

// The k-th smallest (1-based) of values[0:n], reordering them.
float kth_smallest(float* values, int64_t n, int64_t k) {
    std::nth_element(values, values + (k - 1), values + n);
    return values[k - 1];
}

// Every element, for the full selection.
std::vector<float> gather_all(const float* data, const Layout& l, int64_t n) {
    std::vector<float> all(n);
    int64_t at = 0;
    const int inner_dim = l.ndim - 1;
    const int64_t inner = l.sizes[inner_dim], stride = l.strides[inner_dim];
    int64_t outer = n / inner;
    int64_t index[kMaxDims] = {0};
    int64_t offset = 0;
    for (int64_t o = 0; o < outer; ++o) {
        for (int64_t i = 0; i < inner; ++i) all[at++] = data[offset + i * stride];
        for (int d = inner_dim - 1; d >= 0; --d) {
            offset += l.strides[d];
            if (++index[d] < l.sizes[d]) break;
            offset -= l.strides[d] * l.sizes[d];
            index[d] = 0;
        }
    }
    return all;
}

}  // namespace

extern "C" {

// Status codes of ecmt_tail_quantiles.
enum { kOk = 0, kHasNaN = 1, kBadArguments = 2 };

// The k_hi-th and k_lo-th smallest (1-based) of the n elements of a float32 tensor.
//   data, ndim, sizes, strides: the tensor (strides in elements, any non-negative values);
//   sample, m: flat row-major (logical) indices of a sample of the elements;
//   r_hi, r_lo: ranks (1-based) in the sample of the bounds hb and lb;
//   out[0], out[1]: the statistics; info[0], info[1]: elements gathered beyond hb and lb,
//   info[2]: 1 if the full selection was needed for either statistic; threads: for the scan.
// Returns kOk, kHasNaN (no statistic is defined; out is untouched) or kBadArguments.
int ecmt_tail_quantiles(const float* data, int ndim, const int64_t* sizes, const int64_t* strides,
                        const int64_t* sample, int64_t m, int64_t r_hi, int64_t r_lo,
                        int64_t k_hi, int64_t k_lo, float* out, int64_t* info, int threads) {
    if (ndim < 0 || ndim > kMaxDims || m < 1) return kBadArguments;
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) {
        if (sizes[d] < 0 || strides[d] < 0) return kBadArguments;
        n *= sizes[d];
    }
    if (n < 1 || k_hi < 1 || k_hi > n || k_lo < 1 || k_lo > n || r_hi < 1 || r_hi > m ||
        r_lo < 1 || r_lo > m)
        return kBadArguments;

    std::vector<float> values(m);
    for (int64_t s = 0; s < m; ++s) {
        int64_t flat = sample[s], offset = 0;
        if (flat < 0 || flat >= n) return kBadArguments;
        for (int d = ndim - 1; d >= 0; --d) {
            offset += (flat % sizes[d]) * strides[d];
            flat /= sizes[d];
        }
        values[s] = data[offset];
        if (values[s] != values[s]) return kHasNaN;
    }
    const float hb = kth_smallest(values.data(), m, r_hi);
    // After that selection the r_lo-th smallest lies below position r_hi when r_lo < r_hi.
    const float lb = r_lo < r_hi ? kth_smallest(values.data(), r_hi - 1, r_lo) : kth_smallest(values.data(), m, r_lo);

    const Layout layout = coalesce(ndim, sizes, strides);
    bool full_hi = true, full_lo = true;
    info[0] = info[1] = 0;
    if (lb < hb) {
        Scan scan(hb, lb);
        parallel_scan(data, layout, scan, threads);
        if (scan.nans) return kHasNaN;
        info[0] = scan.upper.size;
        info[1] = scan.lower.size;
        const int64_t need_hi = n - k_hi + 1;  // elements >= the upper statistic
        full_hi = scan.upper.size < need_hi;
        full_lo = scan.lower.size < k_lo;
#pragma omp parallel sections num_threads(2) if (threads > 1)
        {
#pragma omp section
            if (!full_hi)
                out[0] = kth_smallest(scan.upper.data.data(), scan.upper.size, scan.upper.size - need_hi + 1);
#pragma omp section
            if (!full_lo) out[1] = kth_smallest(scan.lower.data.data(), scan.lower.size, k_lo);
        }
    }
    info[2] = full_hi || full_lo;
    if (full_hi || full_lo) {
        std::vector<float> all = gather_all(data, layout, n);
        for (float v : all)
            if (v != v) return kHasNaN;
        if (full_hi) out[0] = kth_smallest(all.data(), n, k_hi);
        if (full_lo) out[1] = kth_smallest(all.data(), n, k_lo);
    }
    return kOk;
}

}  // extern "C"


// ---- multi-step kernels: shared layout -----------------------------------------------------------
namespace {

constexpr int64_t kTile = 64;      // elements whose state stays in registers/L1 over the K steps
constexpr int64_t kItem = 2048;    // elements per work item of the parallel loops

// A [K, rest...] input: step stride, then the rest as rows of `inner` elements `inner_stride`
// apart (rows addressed through an odometer over the outer dimensions); elements of the rest are
// numbered in row-major (logical) order, as the state and the output hold them.
struct StepLayout {
    int64_t steps = 1, step_stride = 0;
    int outer_dims = 0;
    int64_t sizes[kMaxDims], strides[kMaxDims];  // outer dimensions of the rest
    int64_t inner = 1, inner_stride = 1, rows = 1;

    int64_t row_offset(int64_t row) const {
        int64_t offset = 0;
        for (int d = outer_dims - 1; d >= 0; --d) {
            offset += (row % sizes[d]) * strides[d];
            row /= sizes[d];
        }
        return offset;
    }
};

// sizes/strides of the whole [K, rest...] tensor (ndim >= 1); dimensions of the rest that are
// adjacent in memory are merged (keeping the logical order), so that a contiguous input is one row.
bool make_layout(int ndim, const int64_t* sizes, const int64_t* strides, StepLayout& l) {
    if (ndim < 1 || ndim > kMaxDims + 1) return false;
    l.steps = sizes[0];
    l.step_stride = strides[0];
    int64_t s[kMaxDims + 1], st[kMaxDims + 1];
    int m = 0;
    for (int d = 1; d < ndim; ++d) {
        if (sizes[d] == 1) continue;
        if (m > 0 && st[m - 1] == strides[d] * sizes[d]) {
            s[m - 1] *= sizes[d];
            st[m - 1] = strides[d];
        } else {
            s[m] = sizes[d];
            st[m] = strides[d];
            ++m;
        }
    }
    if (m == 0) {
        s[0] = 1;
        st[0] = 1;
        m = 1;
    }
    l.inner = s[m - 1];
    l.inner_stride = st[m - 1];
    l.outer_dims = m - 1;
    l.rows = 1;
    for (int d = 0; d < m - 1; ++d) {
        l.sizes[d] = s[d];
        l.strides[d] = st[d];
        l.rows *= s[d];
    }
    return true;
}

// Where a tile of `len` consecutive elements (in the rest's logical order, from element `at`)
// lies in a step's input: one segment per row it touches (rows of a permuted view, such as the q
// of a fused qkv, are as short as a head: the tile spans several), found once per tile.
struct TileSource {
    int segments = 0;
    bool direct = false;  // one contiguous segment: read in place
    int64_t offset[kTile], length[kTile];
};

inline void tile_source(const StepLayout& l, int64_t at, int64_t len, TileSource& s) {
    int64_t row = at / l.inner, col = at % l.inner;
    s.segments = 0;
    while (len > 0) {
        const int64_t take = std::min(len, l.inner - col);
        s.offset[s.segments] = l.row_offset(row) + col * l.inner_stride;
        s.length[s.segments] = take;
        ++s.segments;
        len -= take;
        ++row;
        col = 0;
    }
    s.direct = s.segments == 1 && l.inner_stride == 1;
}

// One tile's input at step k, contiguous: where it lies, or gathered into `buffer`.
inline const float* tile_input(const float* x, const StepLayout& l, int64_t k, const TileSource& s, float* buffer) {
    const float* base = x + k * l.step_stride;
    if (s.direct) return base + s.offset[0];
    float* out = buffer;
    for (int i = 0; i < s.segments; ++i) {
        const float* p = base + s.offset[i];
        const int64_t n = s.length[i];
        if (l.inner_stride == 1) {
            std::memcpy(out, p, static_cast<size_t>(n) * sizeof(float));
        } else {
            for (int64_t j = 0; j < n; ++j) out[j] = p[j * l.inner_stride];
        }
        out += n;
    }
    return buffer;
}

// ---- the multi-threshold neuron ---------------------------------------------------------------
// Per element and step: v += x; the spike is the largest level whose threshold the membrane
// reaches on its side (the table's thresholds grow with the level; NaN thresholds, for levels
// beyond N and for a side whose theta is not positive, are never reached); v -= spike. The same
// comparisons, selections and float operations as the reference rule: spikes and membranes are
// equal bit for bit, whatever K.
// Differential (ECMT_SPEC 14): with the running estimate r and the step number t (t0 + k + 1),
// u = (v + x) - r; s fires on u as above; v = u - s; out = r + s; r = r + s / t; `sent` (if not
// null) receives s. Counts are of s. The order of these float operations is the reference's
// (tests/reference.py), so that every backend gives the same bits.
// Per-channel thresholds (ECMT_SPEC 15): the table is [C, 4, width], one block per channel, and
// the element at row-major index i of a step uses channel ((i / inner) % groups) * cwidth +
// i % cwidth (kernels.channel_map). A neuron tile then reads its elements' levels from a
// per-element copy, lv[q * stride + i] for row q < 4 * width of the channel's block (made by
// tile_levels, once per tile for its K steps where the loops allow), so that the comparisons stay
// vectorised over the elements as with one channel. With one channel the tile reads the table as
// it always did (a template parameter: that code is unchanged).
struct ChannelMap {
    int64_t inner = 1, groups = 1, width = 1;
    const float* levels = nullptr;  // the table channel-major: levels[q * C + c]
    bool per_channel() const { return groups * width > 1; }
};

// The channel-major copy of a [C, rows] table (what ChannelMap::levels points to).
std::vector<float> channel_major(const float* table, int64_t C, int64_t rows) {
    std::vector<float> out(static_cast<size_t>(C * rows));
    for (int64_t c = 0; c < C; ++c)
        for (int64_t q = 0; q < rows; ++q) out[q * C + c] = table[c * rows + q];
    return out;
}

// `m` = the channel map (inner, groups, cwidth) of a [C, 4, width] table, with (several channels)
// its channel-major copy made in `levels`, where m.levels points; false if a size is not positive.
inline bool make_channel_map(int64_t inner, int64_t groups, int64_t cwidth, const float* table, int64_t width,
                             ChannelMap& m, std::vector<float>& levels) {
    if (inner < 1 || groups < 1 || cwidth < 1) return false;
    m = ChannelMap{inner, groups, cwidth};
    if (m.per_channel()) {
        levels = channel_major(table, groups * cwidth, 4 * width);
        m.levels = levels.data();
    }
    return true;
}

// lv[q * kTile + i] = row q (< rows = 4 * width) of the level block of element first + i's
// channel, i < len <= kTile: copied by runs of consecutive channels (a tile of a token's features
// or of a head's channels is one run or two). The row stride is the constant kTile: with a
// run-time stride (reading the channel-major table in place, say) the comparisons are no longer
// vectorised, ten times slower.
inline void tile_levels(const ChannelMap& m, int64_t rows, int64_t first, int64_t len, float* lv) {
    const int64_t C = m.groups * m.width;
    const bool grouped = m.groups > 1;
    int64_t r = first % m.inner, g = grouped ? (first / m.inner) % m.groups : 0, w = first % m.width;
    for (int64_t i = 0; i < len;) {
        int64_t run = std::min(len - i, m.width - w);
        if (grouped) run = std::min(run, m.inner - r);
        const float* from = m.levels + g * m.width + w;
        for (int64_t q = 0; q < rows; ++q)
            std::memcpy(lv + q * kTile + i, from + q * C, static_cast<size_t>(run) * sizeof(float));
        i += run;
        w += run;
        if (w == m.width) w = 0;
        if (grouped) {
            r += run;
            if (r == m.inner) {
                r = 0;
                if (++g == m.groups) g = 0;
            }
        }
    }
}

template <int W, bool Differential = false, bool PerChannel = false>
void mt_tile(float* __restrict v, const float* __restrict x, const float* __restrict table, int64_t width,
             float* __restrict spike, int64_t len, int64_t& count, float* __restrict r = nullptr,
             float step = 1.0f, float* __restrict sent = nullptr, const float* __restrict lv = nullptr) {
    const int w = W > 0 ? W : static_cast<int>(width);
    float tp[W > 0 ? W : 1], sp[W > 0 ? W : 1], tn[W > 0 ? W : 1], sn[W > 0 ? W : 1];
    if (W > 0 && !PerChannel) {
        for (int j = 0; j < W; ++j) {
            tp[j] = table[j];
            sp[j] = table[W + j];
            tn[j] = table[2 * W + j];
            sn[j] = table[3 * W + j];
        }
    }
    int32_t fired = 0;
    for (int64_t i = 0; i < len; ++i) {
        // from rest: 0 + x, which rounds -0 to +0 as the rule does
        const float u = Differential ? (v[i] + x[i]) - r[i] : v[i] + x[i];
        const float negated = -u;
        float up = 0.0f, down = 0.0f;
        if (PerChannel) {
#pragma GCC unroll 64
            for (int j = 0; j < w; ++j) {
                up = u >= lv[j * kTile + i] ? lv[(w + j) * kTile + i] : up;
                down = negated >= lv[(2 * w + j) * kTile + i] ? lv[(3 * w + j) * kTile + i] : down;
            }
        } else if (W > 0) {
#pragma GCC unroll 64
            for (int j = 0; j < W; ++j) {
                up = u >= tp[j] ? sp[j] : up;
                down = negated >= tn[j] ? sn[j] : down;
            }
        } else {
            for (int j = 0; j < w; ++j) {
                up = u >= table[j] ? table[w + j] : up;
                down = negated >= table[2 * w + j] ? table[3 * w + j] : down;
            }
        }
        const float s = up - down;
        v[i] = u - s;
        if (Differential) {
            const float estimate = r[i];
            spike[i] = estimate + s;
            r[i] = estimate + s / step;
            if (sent != nullptr) sent[i] = s;
        } else {
            spike[i] = s;
        }
        fired += s != 0.0f;
    }
    count += fired;
}

// Whether elements first .. first + len - 1 have consecutive channels (one run), and the first.
inline bool one_run(const ChannelMap& m, int64_t first, int64_t len, int64_t& channel) {
    const bool grouped = m.groups > 1;
    const int64_t r = first % m.inner, w = first % m.width;
    channel = (grouped ? (first / m.inner) % m.groups : 0) * m.width + w;
    return len <= m.width - w && (!grouped || len <= m.inner - r);
}

// One neuron tile of either coding (r, step and sent are used by the differential one only) and
// either kind of table (PerChannel: the elements' levels lv, tile_levels' layout).
template <int W, bool PerChannel>
inline void neuron_tile(bool differential, float* v, float* r, const float* x, const float* table, int64_t width,
                        float* out, float* sent, int64_t len, float step, int64_t& count, const float* lv = nullptr) {
    if (differential) mt_tile<W, true, PerChannel>(v, x, table, width, out, len, count, r, step, sent, lv);
    else mt_tile<W, false, PerChannel>(v, x, table, width, out, len, count, nullptr, 1.0f, nullptr, lv);
}

// The same with the kind of table known at run time (per_channel: the levels lv, else the table).
template <int W>
inline void neuron_tile(bool per_channel, bool differential, float* v, float* r, const float* x, const float* table,
                        int64_t width, float* out, float* sent, int64_t len, float step, int64_t& count,
                        const float* lv) {
    if (per_channel) neuron_tile<W, true>(differential, v, r, x, table, width, out, sent, len, step, count, lv);
    else neuron_tile<W, false>(differential, v, r, x, table, width, out, sent, len, step, count);
}

// The levels of one run of elements first .. first + len - 1 (len <= kTile) kept in a slot of
// the caller's: copied (tile_levels) unless the slot already holds the levels of the same
// consecutive channels (q/k/v's per-(head, channel) levels are the same for every token and step).
struct LevelSlot {
    int64_t channel = -1, len = 0;  // what the slot's levels are (channel -1: nothing reusable)
};

inline const float* slot_levels(const ChannelMap& m, int64_t rows, int64_t first, int64_t len, float* lv,
                                LevelSlot& slot) {
    int64_t channel;
    if (one_run(m, first, len, channel)) {
        if (slot.channel != channel || slot.len != len) {
            tile_levels(m, rows, first, len, lv);
            slot = LevelSlot{channel, len};
        }
    } else {
        tile_levels(m, rows, first, len, lv);
        slot = LevelSlot{};
    }
    return lv;
}

template <int W, bool PerChannel>
void mt_steps(const float* x, const StepLayout& l, float* membrane, bool fresh, bool keep, const float* table,
              int64_t width, float* spike, int64_t* counts, int threads, bool differential,
              float* estimate, float t0, float* sent, const ChannelMap& channels) {
    const int64_t n = l.rows * l.inner, K = l.steps;
    for (int64_t k = 0; k < K; ++k) counts[k] = 0;
    const int64_t items = (n + kItem - 1) / kItem;  // runs of kItem elements in logical order
#pragma omp parallel num_threads(threads) if (threads > 1 && n > kItem)
    {
        std::vector<int64_t> local(K, 0);
        std::vector<float> lv(PerChannel ? static_cast<size_t>(4 * width * kTile) : 0);
        TileSource source;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t end = std::min(n, (item + 1) * kItem);
            float v[kTile], r[kTile], buffer[kTile];
            for (int64_t at = item * kItem; at < end; at += kTile) {
                const int64_t len = std::min(kTile, end - at);
                tile_source(l, at, len, source);
                if (PerChannel) tile_levels(channels, 4 * width, at, len, lv.data());  // for the K steps
                for (int64_t j = 0; j < len; ++j) v[j] = fresh ? 0.0f : membrane[at + j];
                if (differential)
                    for (int64_t j = 0; j < len; ++j) r[j] = fresh ? 0.0f : estimate[at + j];
                for (int64_t k = 0; k < K; ++k)
                    neuron_tile<W, PerChannel>(differential, v, r, tile_input(x, l, k, source, buffer), table, width,
                                               spike + k * n + at, sent ? sent + k * n + at : nullptr, len,
                                               t0 + static_cast<float>(k + 1), local[k], lv.data());
                if (keep) {
                    for (int64_t j = 0; j < len; ++j) membrane[at + j] = v[j];
                    if (differential)
                        for (int64_t j = 0; j < len; ++j) estimate[at + j] = r[j];
                }
            }
        }
#pragma omp critical(ecmt_mt_counts)
        for (int64_t k = 0; k < K; ++k) counts[k] += local[k];
    }
}

// The q, k and v neurons of one fused qkv linear output, [K, B, N, 3, H, D] contiguous, in one
// pass that reads it in place (row after row, as the linear layer wrote it) and writes each
// neuron's spikes head-major, [K, B, H, N, D], the layout the attention products take. Each
// element goes through mt_tile as in mt_steps: the same spikes, membranes (kept head-major, the
// logical order of the neuron's [B, H, N, D] input) and counts as three mt_steps calls on the
// permuted views, which read that layout with a stride of 3*H*D between tokens. A part whose
// table is null is skipped (its counts stay 0): one neuron alone reads only its third of each row.
template <int W>
void qkv_mt_steps(const float* x, int64_t K, int64_t B, int64_t N, int64_t H, int64_t D,
                  const float* const* tables, int64_t width, float* const* membranes, bool fresh, bool keep,
                  float* const* spikes, int64_t* counts, int threads, bool differential,
                  float* const* estimates, float t0, float* const* sents, const ChannelMap* channels) {
    const int64_t C = H * D, row = 3 * C, step_in = B * N * row, step_out = B * N * C;
    for (int64_t i = 0; i < 3 * K; ++i) counts[i] = 0;
    bool per_channel[3], any_per_channel = false;
    for (int p = 0; p < 3; ++p) {
        per_channel[p] = tables[p] != nullptr && channels[p].per_channel();
        any_per_channel = any_per_channel || per_channel[p];
    }
    // Work items: blocks of up to `span` tokens of one image, whose membranes (span x 3C) stay in
    // a thread buffer over the K steps (and, differential, the estimates in a second one); each
    // step reads the block's
    // rows in one sweep and writes 3H runs of span x D spikes (per-channel levels copied per run).
    const int64_t span = std::max<int64_t>(1, std::min<int64_t>(N, 16384 / std::max<int64_t>(row, 1)));
    const int64_t blocks = (N + span - 1) / span, items = B * blocks;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
    {
        std::vector<int64_t> local(3 * K, 0);
        std::vector<float> state(static_cast<size_t>(span * row));
        std::vector<float> estimate_state(differential ? static_cast<size_t>(span * row) : 0);
        // per-channel levels: one slot of [4 * width][kTile] per (part, head, tile of a head)
        const int64_t head_tiles = (D + kTile - 1) / kTile;
        std::vector<LevelSlot> slots(any_per_channel ? static_cast<size_t>(3 * H * head_tiles) : 0);
        std::vector<float> slot_buffer(any_per_channel ? static_cast<size_t>(3 * H * head_tiles * 4 * width * kTile)
                                                       : 0);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t b = item / blocks, n0 = (item % blocks) * span, count = std::min(span, N - n0);
            float* v = state.data();
            float* r = estimate_state.data();
            for (int64_t i = 0; i < count; ++i)
                for (int p = 0; p < 3; ++p) {
                    if (tables[p] == nullptr) continue;
                    for (int64_t h = 0; h < H; ++h) {
                        const int64_t at = i * row + p * C + h * D, from = ((b * H + h) * N + n0 + i) * D;
                        if (fresh) {
                            std::fill(v + at, v + at + D, 0.0f);
                            if (differential) std::fill(r + at, r + at + D, 0.0f);
                        } else {
                            std::memcpy(v + at, membranes[p] + from, static_cast<size_t>(D) * sizeof(float));
                            if (differential)
                                std::memcpy(r + at, estimates[p] + from, static_cast<size_t>(D) * sizeof(float));
                        }
                    }
                }
            for (int64_t k = 0; k < K; ++k) {
                const float* in = x + k * step_in + (b * N + n0) * row;
                const float step = t0 + static_cast<float>(k + 1);
                for (int64_t i = 0; i < count; ++i)
                    for (int p = 0; p < 3; ++p) {
                        if (tables[p] == nullptr) continue;
                        for (int64_t h = 0; h < H; ++h) {
                            const int64_t at = i * row + p * C + h * D;
                            const int64_t to = k * step_out + ((b * H + h) * N + n0 + i) * D;
                            float* out = spikes[p] + to;
                            float* sent = (differential && sents && sents[p]) ? sents[p] + to : nullptr;
                            for (int64_t d0 = 0; d0 < D; d0 += kTile) {
                                const int64_t len = std::min(kTile, D - d0);
                                float* o = out + d0;
                                float* so = sent ? sent + d0 : nullptr;
                                if (per_channel[p]) {
                                    const int64_t slot = (p * H + h) * head_tiles + d0 / kTile;
                                    const float* lv = slot_levels(channels[p], 4 * width, to - k * step_out + d0, len,
                                                                  slot_buffer.data() + slot * 4 * width * kTile,
                                                                  slots[slot]);
                                    neuron_tile<W, true>(differential, v + at + d0, r + at + d0, in + at + d0,
                                                         tables[p], width, o, so, len, step, local[p * K + k], lv);
                                } else {
                                    neuron_tile<W, false>(differential, v + at + d0, r + at + d0, in + at + d0,
                                                          tables[p], width, o, so, len, step, local[p * K + k]);
                                }
                            }
                        }
                    }
            }
            if (keep)
                for (int64_t i = 0; i < count; ++i)
                    for (int p = 0; p < 3; ++p) {
                        if (tables[p] == nullptr) continue;
                        for (int64_t h = 0; h < H; ++h) {
                            const int64_t at = i * row + p * C + h * D, to = ((b * H + h) * N + n0 + i) * D;
                            std::memcpy(membranes[p] + to, v + at, static_cast<size_t>(D) * sizeof(float));
                            if (differential)
                                std::memcpy(estimates[p] + to, r + at, static_cast<size_t>(D) * sizeof(float));
                        }
                    }
        }
#pragma omp critical(ecmt_qkv_counts)
        for (int64_t i = 0; i < 3 * K; ++i) counts[i] += local[i];
    }
}

// ---- expectation-compensated products: running sums and scaled differences ---------------------
// Running sums along time of a [K, rest...] input of any strides, from the carried sums (or, on a
// batch's first chunk, from the first step itself): the same float additions as one step at a time.
void running_sums(const float* x, const StepLayout& l, const float* carried, float* sums, int threads) {
    const int64_t n = l.rows * l.inner, K = l.steps;
    const int64_t items = (n + kItem - 1) / kItem;
#pragma omp parallel num_threads(threads) if (threads > 1 && n > kItem)
    {
        TileSource source;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t end = std::min(n, (item + 1) * kItem);
            float c[kTile], buffer[kTile];
            for (int64_t at = item * kItem; at < end; at += kTile) {
                const int64_t len = std::min(kTile, end - at);
                tile_source(l, at, len, source);
                for (int64_t k = 0; k < K; ++k) {
                    const float* xk = tile_input(x, l, k, source, buffer);
                    float* out = sums + k * n + at;
                    if (k == 0 && carried == nullptr) {
                        for (int64_t j = 0; j < len; ++j) c[j] = xk[j];
                    } else if (k == 0) {
                        for (int64_t j = 0; j < len; ++j) c[j] = carried[at + j] + xk[j];
                    } else {
                        for (int64_t j = 0; j < len; ++j) c[j] = c[j] + xk[j];
                    }
                    for (int64_t j = 0; j < len; ++j) out[j] = c[j];
                }
            }
        }
    }
}

// ---- expectation-compensated GELU -------------------------------------------------------------
// exp, erf and tanh in plain float arithmetic that the compiler vectorises. exp: Cephes' expf
// (about 1 ulp); erf: Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), as torch's own
// vectorised CPU erf. GELU from them is within 5e-7 of the float64 GELU (torch's: 1.2e-6).
inline float exp_approx(float y) {
    y = y < -87.3f ? -87.3f : y;  // NaN passes through both comparisons
    y = y > 88.7f ? 88.7f : y;
    const float k = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(y / ln 2)
    float r = y - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline float erf_approx(float v) {
    const float t = 1.0f / (0.3275911f * std::fabs(v) + 1.0f);
    float r = 1.061405429f * t - 1.453152027f;
    r = r * t + 1.421413741f;
    r = r * t - 0.284496736f;
    r = r * t + 0.254829592f;
    return std::copysign(1.0f - r * t * exp_approx(-(v * v)), v);
}

inline float gelu_erf(float a) { return a * 0.5f * (1.0f + erf_approx(a * 0.70710678118654752f)); }

inline float gelu_tanh(float a) {
    const float z = 0.79788456080286536f * (a + 0.044715f * a * a * a);  // sqrt(2/pi) (a + c a^3)
    const float tanh_z = 1.0f - 2.0f / (exp_approx(2.0f * z) + 1.0f);
    return a * 0.5f * (1.0f + tanh_z);
}


// Per element and step s = t0 + k + 1: cum += x; total = s * gelu(cum / s); out = total - prev;
// prev = total (cum and prev start at zero on a batch's first chunk).
// ---- fusion: an MT neuron fed directly by an EC kernel -----------------------------------------
// The EC output (the neuron's input) stays in a buffer of the thread: the kernel writes spikes,
// never the differences. The membrane is the neuron's state (n elements, logical order), read
// unless `fresh`, written if `keep`; counts[k] as ecmt_mt_steps gives them. The neuron performs
// the same float operations on the same values as mt_steps fed the EC output: the same spikes.
struct FusedNeuron {
    const float* table = nullptr;
    int64_t width = 0;
    float* membrane = nullptr;
    bool fresh = true, keep = false;
    float* spike = nullptr;
    int64_t* counts = nullptr;
    // Differential coding (ECMT_SPEC 14): the estimates (n floats, read unless fresh, written if
    // keep, like the membrane) and, if not null, where the spikes s go (`spike` receives r + s).
    bool differential = false;
    float* estimate = nullptr;
    float* sent = nullptr;
    ChannelMap channels;  // per-channel thresholds (ECMT_SPEC 15) when channels.per_channel()

    // The membrane (and estimate) of elements at .. at + len - 1 before the chunk, into v (and r).
    void start(int64_t at, int64_t len, float* v, float* r) const {
        if (fresh) std::fill_n(v, len, 0.0f);
        else std::copy_n(membrane + at, len, v);
        if (differential) {
            if (fresh) std::fill_n(r, len, 0.0f);
            else std::copy_n(estimate + at, len, r);
        }
    }

    // Step k of a tile of len <= kTile elements from `at` (of n a step) fed d: outputs written,
    // non-zero spikes added to count; lv: the tile's levels (tile_levels' layout) if per channel.
    template <int W>
    void step(int64_t k, int64_t n, int64_t at, int64_t len, float* v, float* r, const float* d, float steps,
              int64_t& count, const float* lv) const {
        neuron_tile<W>(channels.per_channel(), differential, v, r, d, table, width, spike + k * n + at,
                       sent ? sent + k * n + at : nullptr, len, steps, count, lv);
    }

    // With keep, the membrane (and estimate) of elements at .. at + len - 1 after the chunk.
    void finish(int64_t at, int64_t len, const float* v, const float* r) const {
        if (!keep) return;
        std::copy_n(v, len, membrane + at);
        if (differential) std::copy_n(r, len, estimate + at);
    }
};

// Runs CALL (a statement using the compile-time table width W) for a neuron's table width.
#define ECMT_WITH_WIDTH(width, CALL)                 \
    switch (width) {                                 \
        case 8: { constexpr int W = 8; CALL; } break;   \
        case 16: { constexpr int W = 16; CALL; } break; \
        case 32: { constexpr int W = 32; CALL; } break; \
        default: { constexpr int W = 0; CALL; } break;  \
    }

template <float (*Gelu)(float), int W>
void ec_gelu_steps(const float* x, float* cum, float* prev, bool fresh, bool keep, float t0, float* out,
                   int64_t K, int64_t n, int threads, const FusedNeuron* neuron = nullptr) {
    const int64_t items = (n + kItem - 1) / kItem;
    if (neuron)
        for (int64_t k = 0; k < K; ++k) neuron->counts[k] = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
    {
        std::vector<int64_t> local(neuron ? K : 0, 0);
        const bool per_channel = neuron && neuron->channels.per_channel();
        std::vector<float> lv(per_channel ? static_cast<size_t>(4 * neuron->width * kTile) : 0);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t end = std::min(n, (item + 1) * kItem);
            for (int64_t col = item * kItem; col < end; col += kTile) {
                const int64_t len = std::min(kTile, end - col);
                float c[kTile], p[kTile], v[kTile], d[kTile], r[kTile];
                if (per_channel)  // the tile's levels, for its K steps
                    tile_levels(neuron->channels, 4 * neuron->width, col, len, lv.data());
                for (int64_t j = 0; j < len; ++j) {
                    c[j] = fresh ? 0.0f : cum[col + j];
                    p[j] = fresh ? 0.0f : prev[col + j];
                }
                if (neuron)
                    for (int64_t j = 0; j < len; ++j) v[j] = neuron->fresh ? 0.0f : neuron->membrane[col + j];
                if (neuron && neuron->differential)
                    for (int64_t j = 0; j < len; ++j) r[j] = neuron->fresh ? 0.0f : neuron->estimate[col + j];
                for (int64_t k = 0; k < K; ++k) {
                    const float steps = t0 + static_cast<float>(k + 1);
                    const float* xk = x + k * n + col;
                    float* ok = neuron ? d : out + k * n + col;
                    for (int64_t j = 0; j < len; ++j) {
                        const float a = c[j] + xk[j];
                        c[j] = a;
                        const float total = Gelu(a / steps) * steps;
                        ok[j] = total - p[j];
                        p[j] = total;
                    }
                    if (per_channel)
                        neuron_tile<W, true>(neuron->differential, v, r, d, neuron->table, neuron->width,
                                             neuron->spike + k * n + col,
                                             neuron->sent ? neuron->sent + k * n + col : nullptr, len, steps,
                                             local[k], lv.data());
                    else if (neuron)
                        neuron_tile<W, false>(neuron->differential, v, r, d, neuron->table, neuron->width,
                                              neuron->spike + k * n + col,
                                              neuron->sent ? neuron->sent + k * n + col : nullptr, len, steps,
                                              local[k]);
                }
                if (keep) {
                    for (int64_t j = 0; j < len; ++j) {
                        cum[col + j] = c[j];
                        prev[col + j] = p[j];
                    }
                }
                if (neuron && neuron->keep) {
                    for (int64_t j = 0; j < len; ++j) neuron->membrane[col + j] = v[j];
                    if (neuron->differential)
                        for (int64_t j = 0; j < len; ++j) neuron->estimate[col + j] = r[j];
                }
            }
        }
        if (neuron) {
#pragma omp critical(ecmt_fused_counts)
            for (int64_t k = 0; k < K; ++k) neuron->counts[k] += local[k];
        }
    }
}

// ---- expectation-compensated softmax and LayerNorm over rows ------------------------------------

// ---- expectation-compensated softmax over rows --------------------------------------------------
constexpr int kLanes = 16;  // partial maxima and sums: vectorised reductions, fixed order

// cum += x; total = steps * softmax(cum / steps) over each row; out = total - prev; prev = total.
void ec_softmax_rows(float* __restrict cum, const float* __restrict x, float* __restrict prev, float steps,
                     float* __restrict out, int64_t cols) {
    float lane[kLanes];
    for (int k = 0; k < kLanes; ++k) lane[k] = -INFINITY;
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
            const float c = cum[j + k] + x[j + k];
            cum[j + k] = c;
            const float a = c / steps;
            out[j + k] = a;
            lane[k] = a > lane[k] ? a : lane[k];
        }
    }
    float peak = -INFINITY;
    for (; j < cols; ++j) {
        const float c = cum[j] + x[j];
        cum[j] = c;
        const float a = c / steps;
        out[j] = a;
        peak = a > peak ? a : peak;
    }
    for (int k = 0; k < kLanes; ++k) peak = lane[k] > peak ? lane[k] : peak;
    for (int k = 0; k < kLanes; ++k) lane[k] = 0.0f;
    j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
            const float y = out[j + k] - peak;
            const float e = y < -87.3f ? 0.0f : exp_approx(y);  // exp(-inf) = 0, as torch's
            out[j + k] = e;
            lane[k] += e;
        }
    }
    float sum = 0.0f;
    for (; j < cols; ++j) {
        const float y = out[j] - peak;
        const float e = y < -87.3f ? 0.0f : exp_approx(y);
        out[j] = e;
        sum += e;
    }
    for (int k = 0; k < kLanes; ++k) sum += lane[k];
    const float scale = steps / sum;
    for (j = 0; j < cols; ++j) {
        const float total = out[j] * scale;
        out[j] = total - prev[j];
        prev[j] = total;
    }
}

// cum += x; total = steps * layer_norm(cum / steps) over each row (biased variance, then
// weight and bias if given); out = total - prev; prev = total.
void ec_layer_norm_row(float* __restrict cum, const float* __restrict x, float* __restrict prev, float steps,
                       const float* __restrict weight, const float* __restrict bias, float eps,
                       float* __restrict out, int64_t cols) {
    float lane[kLanes] = {0.0f};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
            const float c = cum[j + k] + x[j + k];
            cum[j + k] = c;
            const float a = c / steps;
            out[j + k] = a;
            lane[k] += a;
        }
    }
    float sum = 0.0f;
    for (; j < cols; ++j) {
        const float c = cum[j] + x[j];
        cum[j] = c;
        const float a = c / steps;
        out[j] = a;
        sum += a;
    }
    for (int k = 0; k < kLanes; ++k) sum += lane[k];
    const float mean = sum / static_cast<float>(cols);
    for (int k = 0; k < kLanes; ++k) lane[k] = 0.0f;
    j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
            const float d = out[j + k] - mean;
            lane[k] += d * d;
        }
    }
    float squares = 0.0f;
    for (; j < cols; ++j) {
        const float d = out[j] - mean;
        squares += d * d;
    }
    for (int k = 0; k < kLanes; ++k) squares += lane[k];
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(cols) + eps);
    for (j = 0; j < cols; ++j) {
        float y = (out[j] - mean) * rstd;
        if (weight) y *= weight[j];
        if (bias) y += bias[j];
        const float total = y * steps;
        out[j] = total - prev[j];
        prev[j] = total;
    }
}


// K steps of a row function (one of the two above) on [K, rows, cols] contiguous inputs: each
// row's running sum and last total live in a row buffer of the thread for the K steps (and, with
// a fused neuron, its membrane and the step's EC output).
template <int W, class RowStep>
void ec_row_steps(const float* x, float* cum, float* prev, bool fresh, bool keep, float t0, float* out,
                  int64_t K, int64_t rows, int64_t cols, int threads, RowStep row_step,
                  const FusedNeuron* neuron = nullptr) {
    const int64_t n = rows * cols;
    if (neuron)
        for (int64_t k = 0; k < K; ++k) neuron->counts[k] = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && rows > 1)
    {
        const bool differential = neuron && neuron->differential;
        std::vector<float> c(cols), p(cols), v(neuron ? cols : 0), d(neuron ? cols : 0), e(differential ? cols : 0);
        const bool per_channel = neuron && neuron->channels.per_channel();
        const int64_t chunks = (cols + kTile - 1) / kTile;  // a row's tiles, each its own levels
        std::vector<float> lv(per_channel ? static_cast<size_t>(4 * neuron->width * kTile * chunks) : 0);
        std::vector<int64_t> local(neuron ? K : 0, 0);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t at = r * cols;
            if (fresh) {
                std::fill(c.begin(), c.end(), 0.0f);
                std::fill(p.begin(), p.end(), 0.0f);
            } else {
                std::copy_n(cum + at, cols, c.data());
                std::copy_n(prev + at, cols, p.data());
            }
            if (per_channel)  // the row's levels, for its K steps
                for (int64_t off = 0, t = 0; off < cols; off += kTile, ++t)
                    tile_levels(neuron->channels, 4 * neuron->width, at + off, std::min(kTile, cols - off),
                                lv.data() + t * 4 * neuron->width * kTile);
            if (neuron) neuron->start(at, cols, v.data(), e.data());
            for (int64_t k = 0; k < K; ++k) {
                const float steps = t0 + static_cast<float>(k + 1);
                row_step(c.data(), x + k * n + at, p.data(), steps, neuron ? d.data() : out + k * n + at, cols);
                if (!neuron) continue;
                for (int64_t off = 0; off < cols; off += kTile)
                    neuron->step<W>(k, n, at + off, std::min(kTile, cols - off), v.data() + off, e.data() + off,
                                    d.data() + off, steps, local[k],
                                    per_channel ? lv.data() + off / kTile * 4 * neuron->width * kTile : nullptr);
            }
            if (keep) {
                std::copy_n(c.data(), cols, cum + at);
                std::copy_n(p.data(), cols, prev + at);
            }
            if (neuron) neuron->finish(at, cols, v.data(), e.data());
        }
        if (neuron) {
#pragma omp critical(ecmt_fused_counts)
            for (int64_t k = 0; k < K; ++k) neuron->counts[k] += local[k];
        }
    }
}

}  // namespace

extern "C" {

// K steps of the MT neuron. x: float32 [K, rest...] of the given sizes and strides (in elements,
// ndim >= 1); membrane: the rest's n elements in row-major order, read unless `fresh` (the state
// starts at zero) and written if `keep`; table [C, 4, width] (per channel and level: positive
// threshold, positive spike, negative threshold, negative spike), the element at row-major index
// i of a step using channel ((i / inner) % groups) * cwidth + i % cwidth (C = groups * cwidth;
// C = 1: the one-channel path of before); spike: [K, n] contiguous, written;
// counts[k]: the number of non-zero spikes of step k. differential (ECMT_SPEC 14): the estimates
// (n floats, read unless `fresh`, written if `keep`, like the membrane) are carried too, the steps
// are t0+1..t0+K, `spike` receives the outputs r + s and `sent` (if not null, [K, n]) the spikes s.
// Returns 0, or -1 for bad arguments.
int ecmt_mt_steps(const float* x, int ndim, const int64_t* sizes, const int64_t* strides, float* membrane,
                  int fresh, int keep, const float* table, int64_t width, float* spike, int64_t* counts,
                  int threads, int differential, float* estimate, float t0, float* sent, int64_t inner,
                  int64_t groups, int64_t cwidth) {
    StepLayout l;
    if (!make_layout(ndim, sizes, strides, l)) return -1;
    if ((!fresh || keep) && membrane == nullptr) return -1;
    if (differential && (!fresh || keep) && estimate == nullptr) return -1;
    ChannelMap channels;
    std::vector<float> levels;
    if (!make_channel_map(inner, groups, cwidth, table, width, channels, levels)) return -1;
    const bool d = differential != 0;
    if (channels.per_channel()) {
        ECMT_WITH_WIDTH(width, (mt_steps<W, true>(x, l, membrane, fresh, keep, table, width, spike, counts, threads,
                                                  d, estimate, t0, d ? sent : nullptr, channels)))
    } else {
        ECMT_WITH_WIDTH(width, (mt_steps<W, false>(x, l, membrane, fresh, keep, table, width, spike, counts, threads,
                                                   d, estimate, t0, d ? sent : nullptr, channels)))
    }
    return 0;
}

// The q, k and v MT neurons of a fused qkv output x: float32 [K, B, N, 3, H, D] contiguous.
// tables[3]: each neuron's [C, 4, width] table (one width for the three); membranes[3]: each
// neuron's [B, H, N, D] state in row-major order, read unless `fresh`, written if `keep`
// (a null table: that part is skipped, its membrane and spikes are not touched);
// spikes[3]: [K, B, H, N, D] contiguous, written; counts [3, K]: non-zero spikes per neuron and
// step. differential: the three neurons are differential ones (ECMT_SPEC 14), with estimates[3]
// kept as the membranes are, steps t0+1..t0+K, and sents[3] (each may be null) receiving the
// spikes s while spikes[3] receive the outputs r + s. channel_maps [3, 3]: each part's (inner,
// groups, cwidth) over the row-major index of one step of its [B, H, N, D] output, as in
// ecmt_mt_steps. Returns 0, or -1 for bad arguments.
int ecmt_qkv_mt_steps(const float* x, int64_t K, int64_t B, int64_t N, int64_t H, int64_t D,
                      const float* table_q, const float* table_k, const float* table_v, int64_t width,
                      float* membrane_q, float* membrane_k, float* membrane_v, int fresh, int keep,
                      float* spike_q, float* spike_k, float* spike_v, int64_t* counts, int threads,
                      int differential, float* estimate_q, float* estimate_k, float* estimate_v, float t0,
                      float* sent_q, float* sent_k, float* sent_v, const int64_t* channel_maps) {
    if (K < 0 || B < 0 || N < 0 || H < 0 || D < 0 || width < 1) return -1;
    const float* tables[3] = {table_q, table_k, table_v};
    float* membranes[3] = {membrane_q, membrane_k, membrane_v};
    float* estimates[3] = {estimate_q, estimate_k, estimate_v};
    float* spikes[3] = {spike_q, spike_k, spike_v};
    float* sents[3] = {sent_q, sent_k, sent_v};
    ChannelMap channels[3];
    std::vector<float> levels[3];
    int parts = 0;
    for (int p = 0; p < 3; ++p) {
        if (tables[p] == nullptr) continue;  // a part not asked for
        ++parts;
        if (spikes[p] == nullptr || ((!fresh || keep) && membranes[p] == nullptr)) return -1;
        if (differential && (!fresh || keep) && estimates[p] == nullptr) return -1;
        if (channel_maps != nullptr && !make_channel_map(channel_maps[3 * p], channel_maps[3 * p + 1],
                                                         channel_maps[3 * p + 2], tables[p], width, channels[p],
                                                         levels[p]))
            return -1;
    }
    if (parts == 0) return -1;
    ECMT_WITH_WIDTH(width, (qkv_mt_steps<W>(x, K, B, N, H, D, tables, width, membranes, fresh, keep, spikes, counts,
                                            threads, differential != 0, estimates, t0, sents, channels)));
    return 0;
}

// K EC GELU steps t0+1..t0+K on [K, n] contiguous float32 x; cum and prev (n each) are read
// unless `fresh` and written if `keep`; out [K, n] written. approximate: 0 erf GELU, 1 tanh.
void ecmt_ec_gelu_steps(const float* x, float* cum, float* prev, int fresh, int keep, float t0, float* out,
                        int64_t K, int64_t n, int approximate, int threads) {
    if (approximate) ec_gelu_steps<gelu_tanh, 8>(x, cum, prev, fresh, keep, t0, out, K, n, threads);
    else ec_gelu_steps<gelu_erf, 8>(x, cum, prev, fresh, keep, t0, out, K, n, threads);
}

// K EC softmax steps over the last dimension of [K, rows, cols] contiguous float32 x; cum and
// prev ([rows, cols]) read unless `fresh`, written if `keep`; out [K, rows, cols] written.
void ecmt_ec_softmax_steps(const float* x, float* cum, float* prev, int fresh, int keep, float t0, float* out,
                           int64_t K, int64_t rows, int64_t cols, int threads) {
    ec_row_steps<8>(x, cum, prev, fresh, keep, t0, out, K, rows, cols, threads, ec_softmax_rows);
}

// K EC LayerNorm steps over the last dimension (biased variance, then weight and bias of cols
// floats each if not null), with the state and layout of ecmt_ec_softmax_steps.
void ecmt_ec_layer_norm_steps(const float* x, float* cum, float* prev, int fresh, int keep, float t0,
                              const float* weight, const float* bias, float eps, float* out, int64_t K,
                              int64_t rows, int64_t cols, int threads) {
    ec_row_steps<8>(x, cum, prev, fresh, keep, t0, out, K, rows, cols, threads,
                    [=](float* c, const float* xr, float* p, float steps, float* o, int64_t n) {
                        ec_layer_norm_row(c, xr, p, steps, weight, bias, eps, o, n);
                    });
}

// The three EC kernels above with an MT neuron fused after them (FusedNeuron): instead of `out`
// they write spike [K, n] (n: the elements of a step) and counts [K]; table [C, 4, width] with the
// channel map (inner, groups, cwidth) over a step's row-major index, and the membrane (n floats,
// read unless mfresh, written if mkeep) are the neuron's, as in ecmt_mt_steps; differential, its
// estimate and sent as in ecmt_mt_steps (the steps are the EC kernel's). Return 0, or -1 for bad
// arguments.
#define ECMT_FUSED_NEURON                                                                                  \
    if (table == nullptr || ((!mfresh || mkeep) && membrane == nullptr)) return -1;                       \
    if (differential && (!mfresh || mkeep) && estimate == nullptr) return -1;                             \
    ChannelMap channels;                                                                                  \
    std::vector<float> levels;                                                                            \
    if (!make_channel_map(inner, groups, cwidth, table, width, channels, levels)) return -1;              \
    const FusedNeuron neuron{table, width, membrane, mfresh != 0, mkeep != 0, spike, counts,              \
                             differential != 0, estimate, differential ? sent : nullptr, channels};

int ecmt_ec_gelu_mt_steps(const float* x, float* cum, float* prev, int fresh, int keep, float t0, int64_t K,
                          int64_t n, int approximate, const float* table, int64_t width, float* membrane,
                          int mfresh, int mkeep, float* spike, int64_t* counts, int threads, int differential,
                          float* estimate, float* sent, int64_t inner, int64_t groups, int64_t cwidth) {
    ECMT_FUSED_NEURON
    if (approximate) {
        ECMT_WITH_WIDTH(width, (ec_gelu_steps<gelu_tanh, W>(x, cum, prev, fresh, keep, t0, nullptr, K, n, threads,
                                                            &neuron)))
    } else {
        ECMT_WITH_WIDTH(width, (ec_gelu_steps<gelu_erf, W>(x, cum, prev, fresh, keep, t0, nullptr, K, n, threads,
                                                           &neuron)))
    }
    return 0;
}

int ecmt_ec_softmax_mt_steps(const float* x, float* cum, float* prev, int fresh, int keep, float t0, int64_t K,
                             int64_t rows, int64_t cols, const float* table, int64_t width, float* membrane,
                             int mfresh, int mkeep, float* spike, int64_t* counts, int threads, int differential,
                             float* estimate, float* sent, int64_t inner, int64_t groups, int64_t cwidth) {
    ECMT_FUSED_NEURON
    ECMT_WITH_WIDTH(width, (ec_row_steps<W>(x, cum, prev, fresh, keep, t0, nullptr, K, rows, cols, threads,
                                            ec_softmax_rows, &neuron)))
    return 0;
}

int ecmt_ec_layer_norm_mt_steps(const float* x, float* cum, float* prev, int fresh, int keep, float t0,
                                const float* weight, const float* bias, float eps, int64_t K, int64_t rows,
                                int64_t cols, const float* table, int64_t width, float* membrane, int mfresh,
                                int mkeep, float* spike, int64_t* counts, int threads, int differential,
                                float* estimate, float* sent, int64_t inner, int64_t groups, int64_t cwidth) {
    ECMT_FUSED_NEURON
    auto row = [=](float* c, const float* xr, float* p, float steps, float* o, int64_t m) {
        ec_layer_norm_row(c, xr, p, steps, weight, bias, eps, o, m);
    };
    ECMT_WITH_WIDTH(width, (ec_row_steps<W>(x, cum, prev, fresh, keep, t0, nullptr, K, rows, cols, threads, row,
                                            &neuron)))
    return 0;
}

// Running sums along time of x [K, rest...] (float32, sizes and strides in elements, ndim >= 1)
// into sums [K, n] contiguous (row-major order of the rest), from carried (n floats; null: the
// first step is copied). Returns 0, or -1 for bad arguments.
int ecmt_running_sums(const float* x, int ndim, const int64_t* sizes, const int64_t* strides, const float* carried,
                      float* sums, int threads) {
    StepLayout l;
    if (!make_layout(ndim, sizes, strides, l)) return -1;
    running_sums(x, l, carried, sums, threads);
    return 0;
}

// In place on totals [K, n] (contiguous float32 products of running sums, steps t0+1..t0+K):
// total_k = totals[k] / s_k with s_k = t0 + k + 1; totals[k] becomes total_k - total_(k-1), and
// totals[0] total_0 - prev (prev null: total_0 itself); then each is multiplied by `scale` (the
// attention scale of q·kᵀ, applied to the product's output as the model does; 1 otherwise);
// last (n floats, or null) receives total_(K-1).
void ecmt_scaled_differences(float* totals, const float* prev, float* last, float t0, float scale, int64_t K,
                             int64_t n, int threads) {
    const int64_t items = (n + kItem - 1) / kItem;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && items > 1)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t end = std::min(n, (item + 1) * kItem);
        for (int64_t col = item * kItem; col < end; col += kTile) {
            const int64_t len = std::min(kTile, end - col);
            float p[kTile];
            for (int64_t k = 0; k < K; ++k) {
                const float steps = t0 + static_cast<float>(k + 1);
                float* row = totals + k * n + col;
                for (int64_t j = 0; j < len; ++j) {
                    const float total = row[j] / steps;
                    const float step = (k == 0 && prev == nullptr) ? total : total - (k == 0 ? prev[col + j] : p[j]);
                    row[j] = step * scale;  // the product's output times a scale (1: exact identity)
                    p[j] = total;
                }
            }
            if (last != nullptr)
                for (int64_t j = 0; j < len; ++j) last[col + j] = p[j];
        }
    }
}

}  // extern "C"


// ---- the energy monitor's non-zero counts of an EC product's operands ---------------------------
extern "C" {

// Non-zero elements of x viewed as [outer, R, C] (strides in elements: so, sr, sc), counted along
// R (axis 1: out [outer, C], a left operand's columns) or along C (axis 2: out [outer, R], a right
// operand's rows), as float32 (exact: the counts are far below 2^24). One read of x, no
// temporaries. Returns 0, or -1 for bad arguments.
int ecmt_nonzero_counts(const float* x, int64_t outer, int64_t R, int64_t C, int64_t so, int64_t sr, int64_t sc,
                        int axis, float* out, int threads) {
    if (outer < 0 || R < 0 || C < 0 || (axis != 1 && axis != 2)) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && outer > 1 && outer * R * C > 16384)
    for (int64_t o = 0; o < outer; ++o) {
        const float* base = x + o * so;
        if (axis == 1) {
            float* counts = out + o * C;
            for (int64_t c = 0; c < C; ++c) counts[c] = 0.0f;
            for (int64_t r = 0; r < R; ++r) {
                const float* row = base + r * sr;
                if (sc == 1) {
                    for (int64_t c = 0; c < C; ++c) counts[c] += row[c] != 0.0f ? 1.0f : 0.0f;
                } else {
                    for (int64_t c = 0; c < C; ++c) counts[c] += row[c * sc] != 0.0f ? 1.0f : 0.0f;
                }
            }
        } else {
            float* counts = out + o * R;
            for (int64_t r = 0; r < R; ++r) {
                const float* row = base + r * sr;
                int64_t n = 0;
                if (sc == 1) {
                    for (int64_t c = 0; c < C; ++c) n += row[c] != 0.0f;
                } else {
                    for (int64_t c = 0; c < C; ++c) n += row[c * sc] != 0.0f;
                }
                counts[r] = static_cast<float>(n);
            }
        }
    }
    return 0;
}

}  // extern "C"
