import XCTest
@testable import MBQTensor

/// What `mbq` adds to its environment before re-executing itself (BLASCoreSelection).
final class ProcessEnvironmentTests: XCTestCase {
    let avx2: Set<String> = ["avx2", "fma"]

    func testAddsWhatIsMissing() {
        let add = BLASCoreSelection.additions(env: [:], detectedCore: "Prescott", flags: avx2)
        XCTAssertEqual(add, ["OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_THREAD_TIMEOUT": "4",
                             "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"])
    }

    func testNeverChangesWhatTheUserSet() {
        let env = ["OPENBLAS_CORETYPE": "Zen", "OPENBLAS_THREAD_TIMEOUT": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"]
        XCTAssertEqual(BLASCoreSelection.additions(env: env, detectedCore: "Prescott", flags: avx2), [:])
        // A kernel OpenBLAS knows is left to it.
        XCTAssertNil(BLASCoreSelection.additions(env: [:], detectedCore: "Zen", flags: avx2)["OPENBLAS_CORETYPE"])
    }

    func testOptOut() {
        XCTAssertEqual(BLASCoreSelection.additions(env: ["MBQ_KEEP_BLAS_ENV": "1"], detectedCore: "Prescott", flags: avx2), [:])
    }
}
