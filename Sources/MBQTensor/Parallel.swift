import Dispatch

/// How many threads the engine's own loops (not BLAS) may use.
public enum EngineThreads {
    nonisolated(unsafe) public static var count: Int = {
        let n = ProcessInfoShim.activeProcessorCount
        return Swift.max(1, n)
    }()
}

enum ProcessInfoShim {
    static var activeProcessorCount: Int {
        #if os(Linux)
        return Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #else
        return 1
        #endif
    }
}

/// Runs `body` over [0, n) split into at most `EngineThreads.count` contiguous chunks.
/// Chunks are disjoint, so bodies may write disjoint parts of a shared buffer.
@inlinable
public func parallelChunks(_ n: Int, minChunk: Int = 1, _ body: (Range<Int>) -> Void) {
    let threads = Swift.min(EngineThreads.count, Swift.max(1, n / Swift.max(1, minChunk)))
    if threads <= 1 || n <= 1 {
        body(0..<n)
        return
    }
    let chunk = (n + threads - 1) / threads
    DispatchQueue.concurrentPerform(iterations: threads) { t in
        let lo = t * chunk
        let hi = Swift.min(n, lo + chunk)
        if lo < hi { body(lo..<hi) }
    }
}

#if os(Linux)
import Glibc
#endif
