"""The two Triton kernels behind the three ops (launchers live in triton_ops.py).

_dds_kernel: dense x sparse, C = A · op(W). One program computes a [BLOCK_M, B] tile of C for one output block
  (a block row of W for Y = X·Wᵀ, a block column for dX = dY·W) by walking that block's CSR (or transposed)
  entries; `op` is chosen by the in-block strides of W, so forward and dX share the kernel.
_sdd_kernel: sampled dense-dense, dW_e = dY[:, r_e]ᵀ · X[:, c_e] for a list of blocks, one program per block
  and per M split. The same kernel scores blocks for the RigL probe (OUT_SQUARED_NORM stores ||dW_e||_F²) and adds
  blocks into an fp32 accumulator for exact RigL growth over micro-batches (OUT_ACCUMULATE).

Both accumulate in fp32 (fp64 for fp64 inputs) and cast on store. UPCAST is set only under the CPU interpreter,
whose 16-bit tl.dot is wrong (bf16 bit patterns are multiplied as integers).
"""
import triton
import triton.language as tl

# OUT_MODE of _sdd_kernel: what each program stores for its block e (constexprs: a kernel reads them as globals).
OUT_VALUES = tl.constexpr(0)  # the block, cast to out's dtype, at its slot: dvalues [nnz, B, B]
OUT_PARTIALS = tl.constexpr(1)  # the fp32 block of one M split, at [split, slot]: partials [SPLIT, nnz, B, B]
OUT_SQUARED_NORM = tl.constexpr(2)  # ||block||_F^2 at [e]: fp32 [n]
OUT_ACCUMULATE = tl.constexpr(3)  # out[slot] += block, fp32 [n_slots, B, B] (read-add-write: never split over M)


@triton.jit
def _dds_kernel(
    # Pointers
    a_ptr,       # dense A [M, K_a]: X (forward) or dY (dX)
    w_ptr,       # values [nnz, B, B]
    bias_ptr,    # [N_c] (read only if HAS_BIAS)
    c_ptr,       # output C [M, N_c]
    ptr_ptr,     # int32 [n_out_blocks + 1]: row_ptr (forward) or col_ptr (dX)
    idx_ptr,     # int32 [nnz]: block index along K_a of each entry: col_idx or row_idx_t
    slot_ptr,    # int32 [nnz]: slot or slot_t
    order_ptr,   # int32 [n_out_blocks]: output blocks, longest first (heavy programs start early)
    # Sizes
    M, n_out_blocks,
    # Strides
    stride_am, stride_ak, stride_cm, stride_cn,
    stride_wk, stride_wn,  # in-block strides of op(W): (1, B) reads Wᵀ (forward), (B, 1) reads W (dX)
    # Meta-parameters
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # -----------------------------------------------------------
    # Map pid -> (M tile, output block): groups of GROUP_M M-tiles sweep all output blocks, M-tile fastest,
    # so concurrently running programs share A rows and W blocks in L2 (Triton tutorial 03's grouping).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_in_group = GROUP_M * n_out_blocks
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    out_blk = tl.load(order_ptr + (pid % num_pid_in_group) // group_size_m)

    # -----------------------------------------------------------
    # Offsets: rows of A/C for this tile, the B output columns, the K sub-step inside a block.
    start = tl.load(ptr_ptr + out_blk)
    end = tl.load(ptr_ptr + out_blk + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, B)
    m_mask = offs_m[:, None] < M
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am  # [BLOCK_M, 1]
    w_tile = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BLOCK_K, B] offsets in a block

    # -----------------------------------------------------------
    # One flat loop over (entry, K sub-step) so the software pipeliner sees a single loop.
    K_STEPS: tl.constexpr = B // BLOCK_K
    acc = tl.zeros((BLOCK_M, B), dtype=ACC_DTYPE)
    for it in range(0, (end - start) * K_STEPS):
        e = start + it // K_STEPS
        kk = (it % K_STEPS) * BLOCK_K
        blk = tl.load(idx_ptr + e)
        slot = tl.load(slot_ptr + e).to(tl.int64)
        a = tl.load(a_rows + (blk * B + kk + offs_k)[None, :] * stride_ak, mask=m_mask, other=0.0)
        w = tl.load(w_ptr + slot * (B * B) + kk * stride_wk + w_tile)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    # -----------------------------------------------------------
    # Epilogue: bias, cast to the output dtype, masked store (rows past M are not written).
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_blk * B + offs_n)[None, :].to(ACC_DTYPE)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + (out_blk * B + offs_n)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask)


@triton.jit
def _sdd_kernel(
    # Pointers
    dy_ptr,      # dY [M, N_out]
    x_ptr,       # X [M, K_in]
    out_ptr,     # by OUT_MODE (the OUT_* constants above): dvalues [nnz, B, B], fp32 partials [SPLIT, nnz, B, B],
                 # fp32 squared norms [n_entries], or an fp32 accumulator [n_slots, B, B], read and written
    row_ptr,     # int32 [n_entries]: block row of each entry
    col_ptr,     # int32 [n_entries]: block column of each entry
    slot_ptr,    # int32 [n_entries]: where entry e's block goes (every mode but OUT_SQUARED_NORM)
    # Sizes
    M, n_entries, m_per_split,  # m_per_split: a multiple of BLOCK_M, the M range of one program
    # Strides
    stride_dym, stride_dyn, stride_xm, stride_xk,
    # Meta-parameters
    B: tl.constexpr, BLOCK_M: tl.constexpr, OUT_MODE: tl.constexpr,
    UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # -----------------------------------------------------------
    # One program per (live block, M split); blocks of a block row are adjacent, so they share dY in L2.
    e = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.load(row_ptr + e)
    c = tl.load(col_ptr + e)

    # -----------------------------------------------------------
    # Pointers: dY[:, rB:(r+1)B] read transposed as [B, BLOCK_M]; X[:, cB:(c+1)B] as [BLOCK_M, B].
    offs_b = tl.arange(0, B)
    offs_m = tl.arange(0, BLOCK_M)
    m_start = split * m_per_split
    m_end = min(M, m_start + m_per_split)
    dyt_ptrs = (dy_ptr + m_start.to(tl.int64) * stride_dym
                + (r * B + offs_b)[:, None] * stride_dyn + offs_m[None, :] * stride_dym)
    x_ptrs = (x_ptr + m_start.to(tl.int64) * stride_xm
              + offs_m[:, None] * stride_xm + (c * B + offs_b)[None, :] * stride_xk)

    # -----------------------------------------------------------
    # Reduce over this program's M range.
    acc = tl.zeros((B, B), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        m_ok = (m0 + offs_m) < m_end
        dyt = tl.load(dyt_ptrs, mask=m_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dyt_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm

    # -----------------------------------------------------------
    # Store the block (cast), an fp32 partial block, its squared Frobenius norm, or its sum with the accumulator.
    in_block = offs_b[:, None] * B + offs_b[None, :]
    if OUT_MODE == OUT_SQUARED_NORM:
        tl.store(out_ptr + e, tl.sum(tl.sum(acc * acc, axis=1), axis=0).to(tl.float32))
    else:
        slot = tl.load(slot_ptr + e).to(tl.int64)
        if OUT_MODE == OUT_PARTIALS:
            slot += split.to(tl.int64) * n_entries
        out_ptrs = out_ptr + slot * (B * B) + in_block
        if OUT_MODE == OUT_ACCUMULATE:  # read-add-write without atomics: the launcher never splits M here
            acc += tl.load(out_ptrs).to(ACC_DTYPE)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))
