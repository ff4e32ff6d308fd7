//! The KV cache of one sequence: RoPE'd keys and values of every layer and kv head, for the
//! positions run so far. The forward pass reaches it only through heads (`write`, `keys`,
//! `values`), so its layout, or a paged one later, is this file's business alone.

use spinfer_kernels::ATT_PAD;
use std::ops::Range;

/// Keys and values for up to `capacity` positions.
///
/// Per kv head, keys are stored transposed (row d holds dimension d of every position) and
/// values as rows by position, both over `capacity` rounded up to `ATT_PAD` positions: a
/// query's scores are then one vector per 16 positions, summed over the dimensions
/// (`Kernels::attn_scores`), its output one pass over the value rows (`Kernels::attn_values`),
/// and a block of queries shares every load.
pub struct KvCache {
    layout: KvLayout,
    k: Vec<f32>, // (layers, kv_heads, head_dim, stride), transposed
    v: Vec<f32>, // (layers, kv_heads, stride, head_dim)
}

/// Where each head lies in a [`KvCache`]'s storage.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    capacity: usize,
    /// `capacity` rounded up to `ATT_PAD`: the length of a key row.
    stride: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One kv head of one layer, borrowed to write.
pub struct KvHeadMut<'a> {
    head_dim: usize,
    stride: usize,
    k: &'a mut [f32], // (head_dim, stride)
    v: &'a mut [f32], // (stride, head_dim)
}

/// One kv head of one layer, borrowed to read.
#[derive(Clone, Copy)]
pub struct KvHead<'a> {
    head_dim: usize,
    stride: usize,
    k: &'a [f32],
    v: &'a [f32],
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let layout = KvLayout::new(kv_heads, head_dim, capacity);
        let n = layers * kv_heads * layout.per();
        KvCache {
            layout,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// [`KvCache::new`], but an allocation failure is an error rather than an abort (the batch
    /// scheduler sizes caches from requests).
    pub fn try_new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<KvCache, std::collections::TryReserveError> {
        let layout = KvLayout::new(kv_heads, head_dim, capacity);
        let n = layers * kv_heads * layout.per();
        let zeros = |n: usize| -> Result<Vec<f32>, std::collections::TryReserveError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)?;
            v.resize(n, 0.0);
            Ok(v)
        };
        Ok(KvCache {
            layout,
            k: zeros(n)?,
            v: zeros(n)?,
        })
    }

    /// Bytes a cache of these dimensions holds (keys and values).
    pub fn bytes_for(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> usize {
        let per = KvLayout::new(kv_heads, head_dim, capacity).per();
        2 * layers * kv_heads * per * std::mem::size_of::<f32>()
    }

    /// Bytes this cache holds.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Copies positions `0..len` of every head from `src` (same model, any capacity): the KV
    /// of a shared prompt prefix, which depends on those tokens alone.
    pub fn copy_prefix(&mut self, src: &KvCache, len: usize) {
        let (a, b) = (self.layout, src.layout);
        if len == 0 {
            return;
        }
        assert!(
            a.kv_heads == b.kv_heads
                && a.head_dim == b.head_dim
                && self.k.len() / a.per() == src.k.len() / b.per(),
            "copy_prefix: different models"
        );
        assert!(
            len <= a.capacity && len <= b.capacity,
            "copy_prefix: too long"
        );
        let (hd, n) = (a.head_dim, len * a.head_dim);
        for (dst, s) in self
            .k
            .chunks_exact_mut(a.per())
            .zip(src.k.chunks_exact(b.per()))
        {
            for d in 0..hd {
                dst[d * a.stride..d * a.stride + len]
                    .copy_from_slice(&s[d * b.stride..d * b.stride + len]);
            }
        }
        for (dst, s) in self
            .v
            .chunks_exact_mut(a.per())
            .zip(src.v.chunks_exact(b.per()))
        {
            dst[..n].copy_from_slice(&s[..n]);
        }
    }

    /// Most positions it holds.
    pub fn capacity(&self) -> usize {
        self.layout.capacity
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Kv head `head` of `layer`, to write.
    pub fn head_mut(&mut self, layer: usize, head: usize) -> KvHeadMut<'_> {
        let r = self.layout.range(layer, head);
        self.layout.head(&mut self.k[r.clone()], &mut self.v[r])
    }

    /// Kv head `head` of `layer`, to read.
    pub fn head(&self, layer: usize, head: usize) -> KvHead<'_> {
        let r = self.layout.range(layer, head);
        self.layout.head_ref(&self.k[r.clone()], &self.v[r])
    }

    /// The key and value storage, for threads that share the heads out among them: each cuts
    /// its heads with [`KvLayout::range`] and rebuilds them with [`KvLayout::head`].
    pub fn storage_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.k, &mut self.v)
    }
}

impl KvLayout {
    fn new(kv_heads: usize, head_dim: usize, capacity: usize) -> KvLayout {
        KvLayout {
            capacity,
            stride: capacity.next_multiple_of(ATT_PAD),
            kv_heads,
            head_dim,
        }
    }

    /// Floats per head, in each of the key and value storage.
    fn per(&self) -> usize {
        self.stride * self.head_dim
    }

    /// Where head (`layer`, `head`) lies in each of [`KvCache::storage_mut`]'s slices.
    pub fn range(&self, layer: usize, head: usize) -> Range<usize> {
        let per = self.per();
        let i = layer * self.kv_heads + head;
        i * per..(i + 1) * per
    }

    /// A head from its parts of the storage (as cut by [`KvLayout::range`]).
    pub fn head<'a>(&self, k: &'a mut [f32], v: &'a mut [f32]) -> KvHeadMut<'a> {
        assert!(
            k.len() == self.per() && v.len() == self.per(),
            "KvLayout::head: not one head"
        );
        KvHeadMut {
            head_dim: self.head_dim,
            stride: self.stride,
            k,
            v,
        }
    }

    /// A head to read, from its parts of the storage (as cut by [`KvLayout::range`]).
    pub fn head_ref<'a>(&self, k: &'a [f32], v: &'a [f32]) -> KvHead<'a> {
        assert!(
            k.len() == self.per() && v.len() == self.per(),
            "KvLayout::head_ref: not one head"
        );
        KvHead {
            head_dim: self.head_dim,
            stride: self.stride,
            k,
            v,
        }
    }
}

impl KvHeadMut<'_> {
    /// Store the key and value of position `pos`.
    pub fn write(&mut self, pos: usize, key: &[f32], value: &[f32]) {
        let hd = self.head_dim;
        for (d, &x) in key.iter().enumerate() {
            self.k[d * self.stride + pos] = x;
        }
        self.v[pos * hd..(pos + 1) * hd].copy_from_slice(value);
    }
}

impl<'a> KvHead<'a> {
    /// The keys, transposed: (head_dim, stride) and the stride, a multiple of `ATT_PAD` (what
    /// `Kernels::attn_scores` takes). The kernels read past the positions written, up to the
    /// next multiple of `ATT_PAD`, and their scores there are ignored.
    pub fn keys(&self) -> (&'a [f32], usize) {
        (self.k, self.stride)
    }

    /// Values of positions `0..len`: (len, head_dim).
    pub fn values(&self, len: usize) -> &'a [f32] {
        &self.v[..len * self.head_dim]
    }
}
