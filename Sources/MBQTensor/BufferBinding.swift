/// Binding several arrays' storage at once, so that a kernel reads its buffers in one
/// closure instead of a pyramid of nested `withUnsafe…BufferPointer` calls (llm.c's
/// kernels take plain pointers; this is the Swift way to get them for a scope).
///
///     withBuffers([q.data, k.data, v.data], writing: &out) { r, w in
///         let (pq, pk, pv) = (r[0], r[1], r[2]), (pc, pl) = (w[0], w[1])
///         ...
///     }
///
/// The read-only arrays are retained, not copied. Each written array is moved out of
/// `writing` while it is bound (so it is uniquely referenced and never copied on write),
/// then moved back: bind arrays built for the purpose (`[Tensor(zeros:).data, ...]`) and
/// take them out afterwards. Pointers must not escape `body`.
@inlinable
public func withBuffers<T, R>(_ reading: [[T]], writing: inout [[T]],
                              _ body: ([UnsafeBufferPointer<T>], [UnsafeMutableBufferPointer<T>]) throws -> R) rethrows -> R {
    try withBuffers(reading) { r in try withMutableBuffers(&writing) { w in try body(r, w) } }
}

/// Read-only arrays bound at once.
@inlinable
public func withBuffers<T, R>(_ arrays: [[T]], _ body: ([UnsafeBufferPointer<T>]) throws -> R) rethrows -> R {
    var bound: [UnsafeBufferPointer<T>] = []
    bound.reserveCapacity(arrays.count)
    func bind(_ i: Int) throws -> R {
        guard i < arrays.count else { return try body(bound) }
        return try arrays[i].withUnsafeBufferPointer { p in
            bound.append(p)
            return try bind(i + 1)
        }
    }
    return try bind(0)
}

/// Mutable arrays bound at once (each moved out while bound; see `withBuffers`).
@inlinable
public func withMutableBuffers<T, R>(_ arrays: inout [[T]], _ body: ([UnsafeMutableBufferPointer<T>]) throws -> R) rethrows -> R {
    var bound: [UnsafeMutableBufferPointer<T>] = []
    bound.reserveCapacity(arrays.count)
    func bind(_ i: Int) throws -> R {
        guard i < arrays.count else { return try body(bound) }
        var a: [T] = []
        swap(&a, &arrays[i])   // `a` holds the only reference: no copy on write
        defer { swap(&a, &arrays[i]) }
        return try a.withUnsafeMutableBufferPointer { p in
            bound.append(p)
            return try bind(i + 1)
        }
    }
    return try bind(0)
}
