import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Settings that must be in the environment before the process starts: OpenBLAS's,
/// read when the library loads, and glibc's malloc tunables.
///
/// - Kernel: Debian 12's OpenBLAS 0.3.21 does not recognise recent Xeons (Sapphire
///   Rapids reports as a generic "Intel Xeon Processor") and falls back to its Prescott
///   kernels: sgemm at ~19 GFLOP/s per core instead of ~100 (measured here, README).
///   OpenBLAS reads `OPENBLAS_CORETYPE` once, at load time.
/// - Idle threads: after a GEMM, OpenBLAS's workers spin (sched_yield) for 2^28 cycles
///   by default, taking a core from the engine's own loops (softmax, norms) that run
///   between GEMMs. `OPENBLAS_THREAD_TIMEOUT=4` makes them sleep after 2^4 cycles:
///   the 7B block forward went from 5.4 s to 5.0 s on 2 cores.
/// - Huge pages: every fresh page of a large tensor costs a page fault, and in a VM the
///   first touch of memory is slow (an AMD EPYC guest: 4 GiB first touched at 0.3-1.4
///   GB/s in 4 KiB pages, 7.8 GB/s in transparent huge pages; then 20 GB/s).
///   `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` has malloc ask for transparent huge pages
///   (madvise) on the memory it takes from the kernel: a Qwen2-72B-shaped layer and head
///   loaded in 19.6-19.7 s instead of 31.2 s, its job in 234-239 s instead of 262 s. Where the
///   kernel's THP setting is `never` it changes nothing.
///
/// `mbq` re-executes itself once with what is missing set; a variable the user set is
/// never changed, and `MBQ_KEEP_BLAS_ENV=1` turns all of this off.
public enum BLASCoreSelection {
    /// Kernels that use no AVX: what OpenBLAS falls back to on CPUs it does not know.
    static let legacyCores: Set<String> = ["Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom",
                                           "Katmai", "Coppermine", "Northwood", "Banias", "Unknown"]

    /// The CPU feature flags from /proc/cpuinfo.
    public static func cpuFlags() -> Set<String> {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return [] }
        return Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
    }

    /// The OpenBLAS core type this CPU can run, or nil when detection should be trusted.
    /// SkylakeX needs AVX-512 F/BW/DQ/VL; Haswell needs AVX2 + FMA.
    public static func recommendedCore(detected: String, flags: Set<String>) -> String? {
        guard legacyCores.contains(detected) else { return nil }
        if ["avx512f", "avx512bw", "avx512dq", "avx512vl"].allSatisfy(flags.contains) { return "SkylakeX" }
        if ["avx2", "fma"].allSatisfy(flags.contains) { return "Haswell" }
        return nil
    }

    /// The variables to add to `env` (none that are already set).
    public static func additions(env: [String: String], detectedCore: String, flags: Set<String>) -> [String: String] {
        guard env["MBQ_KEEP_BLAS_ENV"] == nil else { return [:] }
        var add: [String: String] = [:]
        if env["OPENBLAS_CORETYPE"] == nil, let core = recommendedCore(detected: detectedCore, flags: flags) {
            add["OPENBLAS_CORETYPE"] = core
        }
        if env["OPENBLAS_THREAD_TIMEOUT"] == nil { add["OPENBLAS_THREAD_TIMEOUT"] = "4" }
        if env["GLIBC_TUNABLES"] == nil { add["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1" }
        return add
    }

    /// A small sgemm checked against a scalar loop: run after a forced kernel choice so
    /// that a kernel that computes wrong results on this CPU is never used.
    public static func selfCheck() -> Bool {
        let (m, n, k) = (37, 29, 67)
        var rng = SeededRandom(seed: 99)
        let a: Tensor<Float> = rng.normalTensor([m, k])
        let b: Tensor<Float> = rng.normalTensor([n, k])
        let c = matmul(a, b, transB: true)
        for i in 0..<m {
            for j in 0..<n {
                var s = 0.0
                for p in 0..<k { s += Double(a.data[i * k + p]) * Double(b.data[j * k + p]) }
                if abs(Double(c.data[i * n + j]) - s) > 1e-3 * max(1, abs(s)) { return false }
            }
        }
        return true
    }

    /// Call first thing in `main`. Re-executes the process with the missing variables
    /// set, or, in the re-executed process, checks the forced kernel and falls back to
    /// OpenBLAS's own choice should it compute wrong results. Returns when no re-exec.
    public static func prepareEnvironment() {
        let env = ProcessInfo.processInfo.environment
        if env["MBQ_BLAS_FORCED"] != nil {
            unsetenv("MBQ_BLAS_FORCED")
            if !selfCheck() {
                FileHandle.standardError.write(Data("mbq: OpenBLAS kernel \(BLASRuntime.coreName) failed its self-check; using the detected kernel\n".utf8))
                unsetenv("OPENBLAS_CORETYPE")
                reexec(["MBQ_KEEP_BLAS_ENV": "1"])
            }
            return
        }
        let add = additions(env: env, detectedCore: BLASRuntime.coreName, flags: cpuFlags())
        guard !add.isEmpty else { return }
        var vars = add
        vars["MBQ_KEEP_BLAS_ENV"] = "1"  // guards against a loop
        if add["OPENBLAS_CORETYPE"] != nil { vars["MBQ_BLAS_FORCED"] = "1" }
        reexec(vars)
    }

    private static func reexec(_ vars: [String: String]) {
        for (k, v) in vars { setenv(k, v, 1) }
        var cargs: [UnsafeMutablePointer<CChar>?] = CommandLine.arguments.map { strdup($0) }
        cargs.append(nil)
        execv("/proc/self/exe", &cargs)
        // execv returns only on failure: carry on as we are.
    }
}
