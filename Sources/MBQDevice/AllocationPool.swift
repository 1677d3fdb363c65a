/// Freed device allocations kept for reuse, by exact size (after PyTorch's caching
/// allocator, much simplified): on a GPU, cuMemFree synchronizes the device and
/// cuMemAlloc costs tens of microseconds, and the backend frees every temporary of every
/// op, so `CUDADevice` keeps them here instead. Reuse is safe on one stream: work on a
/// buffer that was freed is ordered before work on its next user. When an allocation
/// fails for memory, the device returns the whole pool to the driver and tries once more.
public struct AllocationPool: Sendable {
    private var free: [Int: [DevicePointer]] = [:]
    /// Bytes held for reuse.
    public private(set) var pooledBytes = 0

    public init() {}

    /// A pooled allocation of exactly `bytes`, if one is held.
    public mutating func take(_ bytes: Int) -> DevicePointer? {
        guard let p = free[bytes]?.popLast() else { return nil }
        pooledBytes -= bytes
        return p
    }

    /// Keeps `p` (an allocation of `bytes`) for reuse.
    public mutating func put(_ p: DevicePointer, bytes: Int) {
        free[bytes, default: []].append(p)
        pooledBytes += bytes
    }

    /// Everything held, now given up (to be freed for real).
    public mutating func drain() -> [DevicePointer] {
        let all = free.values.flatMap { $0 }
        free = [:]
        pooledBytes = 0
        return all
    }
}
