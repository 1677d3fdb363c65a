/// glibc serves allocations above 32 MiB with fresh mmap'd pages and returns them on
/// free, so every [2048, 11008] activation costs ~22k page faults each time it is
/// allocated again for the next block or sample. Raising the mmap and trim thresholds
/// keeps such buffers in the heap and reuses them.
public enum LargeBufferReuse {
    // glibc <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3. Swift's Glibc module
    // does not export malloc.h, hence the direct declaration.
    @_silgen_name("mallopt")
    private static func mallopt(_ param: Int32, _ value: Int32) -> Int32

    public static func enable() {
        #if os(Linux)
        _ = mallopt(-3, 1 << 30)
        _ = mallopt(-1, Int32.max)
        #endif
    }
}
