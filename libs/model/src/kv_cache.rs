//! Keys and values of committed blocks, per layer, with the reference's sliding window.
//!
//! Keys are stored after rotary at their absolute positions. Attention scores depend only
//! on the distance between query and key positions, so this gives what the reference gives
//! when it re-applies rotary to window-relative positions on every pass, without redoing it.
//!
//! Buffers have room beyond the live range: a pass writes its new keys and values after
//! the live range (the *pending* slot) and attends over both with no copy; a commit only
//! moves the end of the live range. Dropping the oldest block moves its start.
//!
//! A cache of one sequence may begin with tokens it shares read-only with other caches
//! ([`SharedKv`]: a common prompt's blocks, computed once and held once): its live range
//! is the shared tokens it takes followed by its own, and attention reads both in place.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use bd3lm_bytes::Reader;

use crate::{Config, Error, Result};

const MAGIC: &[u8; 8] = b"BD3LMKV\0";
const VERSION: u32 = 1;

/// The KV cache of one batch of sequences being generated.
///
/// Not `Clone`: passes write into its buffers in place (through `&self`, as candle's
/// `slice_set` does), so two handles on the same buffers would corrupt each other.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, key and value buffers of shape (batch, heads, capacity, head_dim).
    buffers: Vec<(Tensor, Tensor)>,
    /// Shared tokens the live range begins with, before those of `buffers`.
    head: Option<Head>,
    /// Offset of the first live token in the buffers.
    start: usize,
    /// Number of live (committed, inside the window) tokens in the buffers.
    len: usize,
    /// Absolute position of the next token to be committed.
    next_pos: usize,
    batch: usize,
    geometry: Geometry,
}

/// What a cache's keys and values are, per sequence and layer, and where.
#[derive(Debug, Clone)]
struct Geometry {
    n_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// Most tokens kept after a commit: `model_length - block_size`, as in the reference.
    keep: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// An empty cache of `batch` sequences and `n_layers` layers of `geometry`, whose next
    /// token is at position `next_pos`.
    fn empty(geometry: Geometry, batch: usize, n_layers: usize, next_pos: usize) -> Result<Self> {
        let mut cache = Self {
            buffers: Vec::new(),
            head: None,
            start: 0,
            len: 0,
            next_pos,
            batch,
            geometry,
        };
        cache.allocate(n_layers, 0)?;
        Ok(cache)
    }

    /// An empty cache for `batch` sequences of a model with config `cfg`.
    pub fn new(cfg: &Config, batch: usize, dtype: DType, device: &Device) -> Result<Self> {
        check_kv_dtype(dtype)?;
        if batch == 0 {
            return Err(Error::Input(
                "a KV cache needs a batch of at least 1".into(),
            ));
        }
        let geometry = Geometry {
            n_heads: cfg.n_heads,
            head_dim: cfg.head_dim(),
            block_size: cfg.block_size,
            keep: cfg.kv_window(),
            dtype,
            device: device.clone(),
        };
        Self::empty(geometry, batch, cfg.n_blocks, 0)
    }

    /// Number of live tokens (committed and inside the window), shared ones included.
    pub fn len(&self) -> usize {
        self.head_len() + self.len
    }

    /// Live tokens taken from a [`SharedKv`].
    fn head_len(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.taken.len())
    }

    /// True when nothing has been committed or everything has slid out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absolute position of the next token to commit: every token ever committed,
    /// including those dropped by the sliding window.
    pub fn next_position(&self) -> usize {
        self.next_pos
    }

    /// Absolute position of the oldest live token.
    pub fn first_position(&self) -> usize {
        self.next_pos - self.len()
    }

    /// Number of sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.buffers.len()
    }

    /// Element type of the stored keys and values.
    pub fn dtype(&self) -> DType {
        self.geometry.dtype
    }

    /// Bytes held by live keys and values (what an export carries), shared ones included.
    pub fn live_bytes(&self) -> usize {
        self.bytes_of(self.len())
    }

    /// Bytes of `tokens` tokens' keys and values of every sequence.
    fn bytes_of(&self, tokens: usize) -> usize {
        2 * self.n_layers()
            * self.batch
            * self.geometry.n_heads
            * tokens
            * self.geometry.head_dim
            * self.geometry.dtype.size_in_bytes()
    }

    /// Bytes its own buffers occupy, live or not: what holding the cache costs in memory
    /// (up to one and a half windows beyond the live range, see [`KvCache::reserve`]);
    /// shared tokens are counted where they are held, once.
    pub fn allocated_bytes(&self) -> usize {
        2 * self.n_layers()
            * self.batch
            * self.geometry.n_heads
            * self.capacity()
            * self.geometry.head_dim
            * self.geometry.dtype.size_in_bytes()
    }

    /// Checks that this cache can serve a model with config `cfg` whose caches hold `dtype`.
    pub(crate) fn check_fits(&self, cfg: &Config, dtype: DType) -> Result<()> {
        let ok = self.n_layers() == cfg.n_blocks
            && self.geometry.n_heads == cfg.n_heads
            && self.geometry.head_dim == cfg.head_dim()
            && self.geometry.block_size == cfg.block_size
            && self.geometry.keep == cfg.kv_window()
            && self.geometry.dtype == dtype;
        if ok {
            return Ok(());
        }
        Err(Error::Input(format!(
            "KV cache layout (layers {}, heads {}, head dim {}, block size {}, window {}, {:?}) does not \
             match the model (layers {}, heads {}, head dim {}, block size {}, window {}, {:?})",
            self.n_layers(),
            self.geometry.n_heads,
            self.geometry.head_dim,
            self.geometry.block_size,
            self.geometry.keep,
            self.geometry.dtype,
            cfg.n_blocks,
            cfg.n_heads,
            cfg.head_dim(),
            cfg.block_size,
            cfg.kv_window(),
            dtype
        )))
    }

    fn capacity(&self) -> usize {
        self.buffers
            .first()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    fn allocate(&mut self, n_layers: usize, capacity: usize) -> Result<()> {
        let shape = (
            self.batch,
            self.geometry.n_heads,
            capacity,
            self.geometry.head_dim,
        );
        let mut buffers = Vec::with_capacity(n_layers);
        for layer in 0..n_layers {
            let k = Tensor::zeros(shape, self.geometry.dtype, &self.geometry.device)?;
            let v = Tensor::zeros(shape, self.geometry.dtype, &self.geometry.device)?;
            if self.len > 0 {
                let (old_k, old_v) = &self.buffers[layer];
                k.slice_set(&old_k.narrow(2, self.start, self.len)?.contiguous()?, 2, 0)?;
                v.slice_set(&old_v.narrow(2, self.start, self.len)?.contiguous()?, 2, 0)?;
            }
            buffers.push((k, v));
        }
        self.buffers = buffers;
        self.start = 0;
        Ok(())
    }

    /// Makes room for `new` pending tokens after the live range, growing the buffers or
    /// moving the live range to the front when needed.
    pub(crate) fn reserve(&mut self, new: usize) -> Result<()> {
        let needed = self.len + new;
        if self.start + needed <= self.capacity() {
            return Ok(());
        }
        // Room for half a window more than a full pass: the window slides by moving `start`,
        // and the live range is copied to the front once per half window.
        let full = self.geometry.keep + self.geometry.block_size;
        let capacity = needed
            .max((self.capacity() * 2).min(full + full / 2))
            .max(self.geometry.block_size);
        self.allocate(self.buffers.len(), capacity)
    }

    /// Writes the new tokens' keys and values of `layer`, each (batch, heads, new, r), into
    /// the pending slot after the live range, rounded to the cache's dtype.
    pub(crate) fn write_pending(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let (kb, vb) = &self.buffers[layer];
        kb.slice_set(&k.to_dtype(self.geometry.dtype)?, 2, self.start + self.len)?;
        vb.slice_set(&v.to_dtype(self.geometry.dtype)?, 2, self.start + self.len)?;
        Ok(())
    }

    /// The key and value buffers of `layer`, each (batch, heads, capacity, head_dim), and
    /// the offset of the live range in them (pending tokens follow the live ones).
    pub(crate) fn layer_buffers(&self, layer: usize) -> (&Tensor, &Tensor, usize) {
        let (k, v) = &self.buffers[layer];
        (k, v, self.start)
    }

    /// The shared keys and values of `layer`, each (1, heads, shared len, head_dim), and
    /// the tokens of them the live range begins with; `None` without shared tokens.
    pub(crate) fn shared_buffers(
        &self,
        layer: usize,
    ) -> Option<(&Tensor, &Tensor, std::ops::Range<usize>)> {
        let head = self.head.as_ref()?;
        let (k, v) = &head.kv.buffers[layer];
        Some((k, v, head.taken.clone()))
    }

    /// Keys and values of `layer` to attend over, in `dtype` (the compute dtype): the live
    /// range followed by `new` pending tokens.
    pub(crate) fn keys_values(
        &self,
        layer: usize,
        new: usize,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = self.span(layer, 0, self.len() + new)?;
        Ok((k.to_dtype(dtype)?, v.to_dtype(dtype)?))
    }

    /// Keys and values of `layer` of `len` tokens from `offset` in the live range (the
    /// pending tokens follow it): views of the buffers, joined when they span the shared
    /// tokens and the cache's own.
    fn span(
        &self,
        layer: usize,
        offset: usize,
        len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (kb, vb) = &self.buffers[layer];
        let shared = self.head_len();
        let taken = shared.saturating_sub(offset).min(len);
        let at = self.start + offset.saturating_sub(shared);
        let own = (
            kb.narrow(2, at, len - taken)?,
            vb.narrow(2, at, len - taken)?,
        );
        let Some(head) = self.head.as_ref().filter(|_| taken > 0) else {
            return Ok(own);
        };
        let (hk, hv) = &head.kv.buffers[layer];
        let at = head.taken.start + offset;
        let part = (hk.narrow(2, at, taken)?, hv.narrow(2, at, taken)?);
        if taken == len {
            return Ok(part);
        }
        Ok((
            Tensor::cat(&[&part.0, &own.0], 2)?,
            Tensor::cat(&[&part.1, &own.1], 2)?,
        ))
    }

    /// Makes the `new` pending tokens part of the cache, then drops the oldest blocks
    /// beyond the window: shared ones first (a head fully slid out is let go).
    pub(crate) fn append_pending(&mut self, new: usize) {
        self.len += new;
        self.next_pos += new;
        let mut drop = self.len().saturating_sub(self.geometry.keep);
        if let Some(head) = &mut self.head {
            let shared = drop.min(head.taken.len());
            head.taken.start += shared;
            drop -= shared;
            if head.taken.is_empty() {
                self.head = None;
            }
        }
        self.start += drop;
        self.len -= drop;
    }

    /// Most tokens that can be committed in one pass while each block still sees exactly
    /// the window the reference would give it (nothing is dropped inside the pass).
    pub(crate) fn max_commit_tokens(&self) -> usize {
        self.geometry.block_size
            * (1 + self.geometry.keep.saturating_sub(self.len()) / self.geometry.block_size)
    }

    /// Serialises the live keys and values with their layout, positions and dtype.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.export(self.first_position(), self.len())
    }

    /// Serialises the live tokens at absolute positions `first..first + len` (for example
    /// one committed block), with the cache's layout, the positions, the dtype and a
    /// checksum. [`KvCache::import`] puts consecutive segments back together.
    pub fn export(&self, first: usize, len: usize) -> Result<Vec<u8>> {
        if first < self.first_position() || first + len > self.next_pos {
            return Err(Error::Input(format!(
                "positions {first}..{} are not live (live: {}..{})",
                first + len,
                self.first_position(),
                self.next_pos
            )));
        }
        let offset = first - self.first_position();
        let mut out = Vec::with_capacity(64 + self.bytes_of(len));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(dtype_code(self.geometry.dtype));
        for v in [
            self.n_layers(),
            self.batch,
            self.geometry.n_heads,
            self.geometry.head_dim,
            self.geometry.block_size,
            self.geometry.keep,
        ] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        out.extend_from_slice(&(first as u64).to_le_bytes());
        out.extend_from_slice(&(len as u64).to_le_bytes());
        for layer in 0..self.n_layers() {
            let (k, v) = self.span(layer, offset, len)?;
            for t in [k, v] {
                append_raw(&t.contiguous()?, &mut out)?;
            }
        }
        Ok(bd3lm_bytes::seal(out))
    }

    /// A cache of one sequence whose live range is the window before position `end` of
    /// `kv`'s tokens, taken from it with no copy.
    pub fn on_shared(kv: Arc<SharedKv>, end: usize) -> Result<Self> {
        let first = end.saturating_sub(kv.geometry.keep);
        if !kv.holds_window_before(end) {
            return Err(Error::Input(format!(
                "shared tokens {}..{} do not hold the window before position {end}",
                kv.first,
                kv.end()
            )));
        }
        let mut cache = Self::empty(kv.geometry.clone(), 1, kv.buffers.len(), end)?;
        cache.reserve(cache.geometry.block_size)?;
        cache.head = Some(Head {
            taken: first - kv.first..end - kv.first,
            kv,
        });
        Ok(cache)
    }

    /// Moves this cache's live tokens (of one sequence) into a new [`SharedKv`] that it
    /// then takes them from: from now on they can be shared with other caches, held
    /// once. A copy of the live range, once.
    pub fn share(&mut self) -> Result<Arc<SharedKv>> {
        if self.batch != 1 || self.is_empty() {
            return Err(Error::Input(
                "only a cache of one sequence with live tokens is shared".into(),
            ));
        }
        let len = self.len();
        let buffers = (0..self.n_layers())
            .map(|layer| {
                let (k, v) = self.span(layer, 0, len)?;
                Ok((fresh(&k)?, fresh(&v)?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let kv = Arc::new(SharedKv {
            buffers,
            first: self.first_position(),
            len,
            geometry: self.geometry.clone(),
        });
        let end = self.next_pos;
        *self = Self::on_shared(kv.clone(), end)?;
        Ok(kv)
    }

    /// Whether every live token is taken from a [`SharedKv`] (none of its own yet).
    pub fn is_shared(&self) -> bool {
        self.head.is_some() && self.len == 0
    }

    /// The shared tokens this cache takes, when it takes any.
    pub fn shared(&self) -> Option<&Arc<SharedKv>> {
        self.head.as_ref().map(|h| &h.kv)
    }

    /// Decodes bytes written by [`KvCache::to_bytes`] onto `device`.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        Self::import(&[bytes], device)
    }

    /// Builds a cache from segments written by [`KvCache::export`] that cover consecutive
    /// positions, oldest first, with one layout; the cache ends after the last segment.
    ///
    /// Every length is checked against the bytes present before anything is allocated, and
    /// each segment's checksum guards its content: hostile or corrupt bytes give an error.
    pub fn import(segments: &[&[u8]], device: &Device) -> Result<Self> {
        let decoded = segments
            .par_iter()
            .map(|s| Segment::decode(s))
            .collect::<Result<Vec<_>>>()?;
        let first = decoded
            .first()
            .ok_or_else(|| Error::CacheDecode("no segments".into()))?;
        let layout = first.layout;
        let mut next = first.first;
        for seg in &decoded {
            if seg.layout != layout {
                return Err(Error::CacheDecode("segments of different layouts".into()));
            }
            if seg.first != next {
                return Err(Error::CacheDecode(format!(
                    "segment at position {} does not follow position {next}",
                    seg.first
                )));
            }
            next += seg.len;
        }
        let [n_layers, batch, n_heads, head_dim, block_size, keep] = layout.dims;
        let len = next - first.first;
        // With no position, nothing bounds the room reserved for the next passes (a
        // block's worth, of a size the header alone claims): found by the fuzzer, as an
        // allocation that killed the process. With some, the room is at most twice them.
        if len == 0 {
            return Err(Error::CacheDecode("segments hold no position".into()));
        }
        if len > keep || !len.is_multiple_of(block_size) || !next.is_multiple_of(block_size) {
            return Err(Error::CacheDecode(format!(
                "segments hold {len} tokens ending at {next}; window {keep}, block size {block_size}"
            )));
        }
        // Decoded straight into buffers with room for the next passes (as `reserve` would
        // grow them), so the first pass after an import copies nothing.
        let full = keep + block_size;
        let capacity = ((len + block_size) * 3 / 2)
            .min(full + full / 2)
            .max(len + block_size);
        let shape = [batch, n_heads, capacity, head_dim];
        // Every buffer on its own thread of the pool: a window from the store is megabytes
        // of fresh pages to fill.
        let tensors = (0..2 * n_layers)
            .into_par_iter()
            .map(|tensor| {
                let buffer = Buffer {
                    segments: &decoded,
                    tensor,
                    shape,
                    device,
                };
                match layout.dtype {
                    DType::F32 => buffer.assemble(f32::from_le_bytes),
                    DType::BF16 => buffer.assemble(half::bf16::from_le_bytes),
                    _ => buffer.assemble(half::f16::from_le_bytes),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut tensors = tensors.into_iter();
        let buffers = std::iter::from_fn(|| Some((tensors.next()?, tensors.next()?))).collect();
        Ok(Self {
            buffers,
            head: None,
            start: 0,
            len,
            next_pos: next,
            batch,
            geometry: Geometry {
                n_heads,
                head_dim,
                block_size,
                keep,
                dtype: layout.dtype,
                device: device.clone(),
            },
        })
    }
}

/// A contiguous copy of `t` in buffers of its own (a view's copy would keep the
/// buffer it views, or its layout).
fn fresh(t: &Tensor) -> candle_core::Result<Tensor> {
    let out = Tensor::zeros(t.shape(), t.dtype(), t.device())?;
    out.slice_set(&t.contiguous()?, 2, 0)?;
    Ok(out)
}

/// The tokens a cache takes from a [`SharedKv`].
#[derive(Debug)]
struct Head {
    kv: Arc<SharedKv>,
    /// Its tokens the cache's live range begins with (offsets in `kv`).
    taken: std::ops::Range<usize>,
}

/// Keys and values of committed tokens of one sequence, read-only, that many caches of
/// one sequence may begin with ([`KvCache::on_shared`], [`KvCache::share`]): a common
/// prompt's blocks, computed once and held once.
#[derive(Debug)]
pub struct SharedKv {
    /// Per layer, keys and values of shape (1, heads, len, head_dim).
    buffers: Vec<(Tensor, Tensor)>,
    /// Absolute position of the first token.
    first: usize,
    len: usize,
    geometry: Geometry,
}

impl SharedKv {
    /// Absolute position of its first token.
    pub fn first_position(&self) -> usize {
        self.first
    }

    /// Absolute position after its last token.
    pub fn end(&self) -> usize {
        self.first + self.len
    }

    /// Tokens per block of the model that computed it.
    pub fn block_size(&self) -> usize {
        self.geometry.block_size
    }

    /// Whether a cache ending at position `end` can take its window from it
    /// ([`KvCache::on_shared`]).
    pub fn holds_window_before(&self, end: usize) -> bool {
        end > self.first
            && end <= self.end()
            && end.saturating_sub(self.geometry.keep) >= self.first
            && end.is_multiple_of(self.geometry.block_size)
    }

    /// Bytes of its keys and values.
    pub fn bytes(&self) -> usize {
        2 * self.buffers.len()
            * self.geometry.n_heads
            * self.len
            * self.geometry.head_dim
            * self.geometry.dtype.size_in_bytes()
    }
}

/// Layout of a serialised segment: dtype and (layers, batch, heads, head dim, block
/// size, window).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layout {
    dtype: DType,
    dims: [usize; 6],
}

/// A decoded, checked segment whose tensors are still bytes.
struct Segment<'a> {
    layout: Layout,
    first: usize,
    len: usize,
    data: &'a [u8],
}

impl<'a> Segment<'a> {
    fn decode(bytes: &'a [u8]) -> Result<Self> {
        let bad = |m: &str| Error::CacheDecode(m.to_string());
        if bytes.len() < 8 + 4 + 1 + 6 * 4 + 16 + 8 {
            return Err(bad("too short for a header"));
        }
        let body = bd3lm_bytes::unseal(bytes).ok_or_else(|| bad("checksum mismatch"))?;
        let mut r = Reader::new(body);
        if r.take(8)? != MAGIC {
            return Err(bad("not a BD3-LM KV cache (bad magic)"));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(Error::CacheDecode(format!("unsupported version {version}")));
        }
        let dtype = dtype_from_code(r.take(1)?[0])?;
        let mut dims = [0usize; 6];
        for d in &mut dims {
            *d = r.u32()? as usize;
        }
        let first = usize::try_from(r.u64()?).map_err(|_| bad("position overflows"))?;
        let len = usize::try_from(r.u64()?).map_err(|_| bad("length overflows"))?;
        let [n_layers, batch, n_heads, head_dim, _, keep] = dims;
        if dims.iter().take(5).any(|&d| d == 0) {
            return Err(bad("zero-sized layout"));
        }
        if len > keep || first.checked_add(len).is_none() {
            return Err(Error::CacheDecode(format!(
                "segment of {len} tokens exceeds the window of {keep}"
            )));
        }
        let expected = [
            2 * n_layers,
            batch,
            n_heads,
            len,
            head_dim,
            dtype.size_in_bytes(),
        ]
        .iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| bad("size overflows"))?;
        if r.remaining() != expected {
            return Err(Error::CacheDecode(format!(
                "expected {expected} bytes of keys and values, found {}",
                r.remaining()
            )));
        }
        Ok(Self {
            layout: Layout { dtype, dims },
            first,
            len,
            data: r.rest(),
        })
    }

    /// The bytes of tensor `i` (layer `i / 2`, keys then values), laid out (batch, heads,
    /// len, head dim).
    fn part(&self, i: usize) -> &[u8] {
        let [_, batch, n_heads, head_dim, _, _] = self.layout.dims;
        let size = batch * n_heads * self.len * head_dim * self.layout.dtype.size_in_bytes();
        &self.data[i * size..(i + 1) * size]
    }
}

/// One key or value buffer of an imported cache: tensor `tensor` of consecutive
/// `segments` in a buffer of `shape` (batch, heads, capacity, head dim).
struct Buffer<'a> {
    segments: &'a [Segment<'a>],
    tensor: usize,
    shape: [usize; 4],
    device: &'a Device,
}

impl Buffer<'_> {
    /// The buffer with each (batch, head) row holding the segments' tokens first and zeros
    /// after them, decoded from the bytes by `decode` straight into its elements.
    fn assemble<T: candle_core::WithDType, const N: usize>(
        &self,
        decode: fn([u8; N]) -> T,
    ) -> candle_core::Result<Tensor> {
        let [batch, heads, capacity, head_dim] = self.shape;
        let mut out = vec![T::zero(); batch * heads * capacity * head_dim];
        for (row, dst) in out.chunks_exact_mut(capacity * head_dim).enumerate() {
            let mut at = 0;
            for seg in self.segments {
                let n = seg.len * head_dim;
                let src = &seg.part(self.tensor)[row * n * N..(row + 1) * n * N];
                for (d, s) in dst[at..at + n].iter_mut().zip(src.chunks_exact(N)) {
                    *d = decode(s.try_into().expect("chunks of N bytes"));
                }
                at += n;
            }
        }
        Tensor::from_vec(out, &self.shape, self.device)
    }
}

/// Checks that KV caches can hold `dtype`: f32, bf16 or f16.
pub(crate) fn check_kv_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(Error::Input(format!(
            "KV caches hold f32, bf16 or f16, not {other:?}"
        ))),
    }
}

/// The header's code of a dtype that [`check_kv_dtype`] accepted.
fn dtype_code(dtype: DType) -> u8 {
    match dtype {
        DType::BF16 => 1,
        DType::F16 => 2,
        _ => 0,
    }
}

fn dtype_from_code(code: u8) -> Result<DType> {
    match code {
        0 => Ok(DType::F32),
        1 => Ok(DType::BF16),
        2 => Ok(DType::F16),
        other => Err(Error::CacheDecode(format!("unknown dtype code {other}"))),
    }
}

/// Appends the little-endian bytes of a contiguous tensor of a dtype that
/// [`check_kv_dtype`] accepted.
fn append_raw(t: &Tensor, out: &mut Vec<u8>) -> Result<()> {
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        _ => flat
            .to_vec1::<f32>()?
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    Ok(())
}

#[cfg(test)]
impl KvCache {
    /// Starts position counting at `offset` instead of 0 (tests of position invariance).
    pub(crate) fn shift_positions(&mut self, offset: usize) {
        self.next_pos += offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{small_config, small_model, tokens, zeros};

    /// A cache holding two committed blocks of 4.
    fn filled_cache() -> KvCache {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let mut cache = model.new_cache(1).unwrap();
        model
            .commit(&tokens(1, 8, cfg.vocab_size, 1), &zeros(1), &mut cache)
            .unwrap();
        cache
    }

    fn filled_cache_bytes() -> Vec<u8> {
        filled_cache().to_bytes().unwrap()
    }

    #[test]
    fn corrupt_or_truncated_bytes_are_errors() {
        let bytes = filled_cache_bytes();
        assert!(KvCache::from_bytes(&bytes, &Device::Cpu).is_ok());
        for cut in [0, 10, 40, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                KvCache::from_bytes(&bytes[..cut], &Device::Cpu).is_err(),
                "cut {cut}"
            );
        }
        let mut flipped = bytes.clone();
        flipped[100] ^= 1;
        assert!(
            KvCache::from_bytes(&flipped, &Device::Cpu)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
    }

    /// A header claiming a huge length, with a valid checksum, is refused before any
    /// allocation.
    #[test]
    fn hostile_lengths_are_refused() {
        let bytes = filled_cache_bytes();
        let len_offset = 8 + 4 + 1 + 6 * 4 + 8;
        let mut body = bytes[..bytes.len() - 8].to_vec();
        body[len_offset..len_offset + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(KvCache::from_bytes(&bd3lm_bytes::seal(body), &Device::Cpu).is_err());
    }

    /// The fuzzer's crasher, kept: a sealed segment of no positions whose header claims a
    /// huge block size is refused, not imported with a block's worth of room reserved.
    #[test]
    fn an_empty_segment_claiming_a_huge_block_is_refused() {
        let segment = |block_size: u32| {
            let mut body = MAGIC.to_vec();
            body.extend_from_slice(&VERSION.to_le_bytes());
            body.push(dtype_code(DType::F32));
            for d in [2, 1, 2, 8, block_size, block_size] {
                body.extend_from_slice(&d.to_le_bytes());
            }
            body.extend_from_slice(&0u64.to_le_bytes());
            body.extend_from_slice(&0u64.to_le_bytes());
            bd3lm_bytes::seal(body)
        };
        let err = KvCache::import(&[&segment(1 << 30)], &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("no position"), "{err}");
    }

    /// Caches that take their first tokens from a shared copy denoise, commit, export
    /// and slide their window with the bits of the cache that holds them itself, hold
    /// them once, and let go of them once the window has slid past them.
    #[test]
    fn caches_on_shared_tokens_are_the_cache_they_came_from() {
        let cfg = small_config(4);
        let model = small_model(&cfg);
        let prompt = tokens(1, 8, cfg.vocab_size, 1);
        let (mut own, mut first) = (model.new_cache(1).unwrap(), model.new_cache(1).unwrap());
        for cache in [&mut own, &mut first] {
            model.commit(&prompt, &zeros(1), cache).unwrap();
        }
        let kv = first.share().unwrap();
        let mut second = KvCache::on_shared(kv.clone(), 8).unwrap();
        assert_eq!((Arc::strong_count(&kv), kv.bytes()), (3, own.live_bytes()));
        assert!(second.allocated_bytes() < own.allocated_bytes());
        assert!(
            KvCache::on_shared(kv.clone(), 12).is_err(),
            "past its tokens"
        );
        // The window holds 20 tokens: the fourth block slides into the shared ones.
        for step in 0..5 {
            let block = tokens(1, 4, cfg.vocab_size, 10 + step);
            let want = model.denoise(&block, &zeros(1), &mut own).unwrap();
            model.commit(&block, &zeros(1), &mut own).unwrap();
            for cache in [&mut first, &mut second] {
                let got = model.denoise(&block, &zeros(1), cache).unwrap();
                assert_eq!(crate::test_util::max_diff(&got, &want), 0.0, "block {step}");
                model.commit(&block, &zeros(1), cache).unwrap();
                assert_eq!(cache.to_bytes().unwrap(), own.to_bytes().unwrap());
                assert_eq!(cache.first_position(), own.first_position());
            }
        }
        assert!(first.shared().is_none() && second.shared().is_none());
        assert_eq!(Arc::strong_count(&kv), 1, "slid out: let go");
    }

    /// Segments whose bytes were mutated, then sealed again (so that the header parser,
    /// not the checksum, meets them), import as errors or caches, never panics; alone or
    /// after a valid segment.
    #[test]
    fn fuzzed_segments_never_panic() {
        let cache = filled_cache();
        let first = cache.export(0, 4).unwrap();
        let bodies: Vec<Vec<u8>> = [cache.export(0, 4), cache.export(4, 4)]
            .into_iter()
            .map(|s| {
                let s = s.unwrap();
                s[..s.len() - 8].to_vec()
            })
            .collect();
        let budget = std::time::Duration::from_secs(2);
        bd3lm_bytes::fuzz::fuzz("kv segment import", &bodies, budget, |body| {
            let sealed = bd3lm_bytes::seal(body.to_vec());
            let _ = KvCache::import(&[&sealed], &Device::Cpu);
            let _ = KvCache::import(&[&first, &sealed], &Device::Cpu);
            let _ = KvCache::import(&[body], &Device::Cpu);
        });
    }
}
