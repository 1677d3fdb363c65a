/// glibc serves allocations above 32 MiB with fresh mmap'd pages and returns them on
/// free, so every [2048, 11008] activation costs ~22k page faults each time it is
/// allocated again for the next block or sample. Raising the mmap and trim thresholds
/// keeps such buffers in the heap and reuses them. That holds only in the main arena:
/// a thread's own arena grows in heaps of at most 64 MiB and serves anything larger
/// with fresh mmap'd pages whatever the threshold, so a worker (which computes on its
/// own thread) paid the page faults of every large buffer on every use (measured: a
/// 72B-shaped layer's search spent 12% of its time in the kernel's page faults). One
/// arena for every thread keeps them all in the reused heap.
public enum LargeBufferReuse {
    // glibc <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3, M_ARENA_MAX = -8.
    // Swift's Glibc module does not export malloc.h, hence the direct declaration.
    @_silgen_name("mallopt")
    private static func mallopt(_ param: Int32, _ value: Int32) -> Int32

    public static func enable() {
        #if os(Linux)
        _ = mallopt(-3, 1 << 30)
        _ = mallopt(-1, Int32.max)
        _ = mallopt(-8, 1)
        #endif
    }
}
