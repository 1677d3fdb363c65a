import Foundation
import MBQDevice
import XCTest

/// The kernel source compiled by NVRTC for the GPUs users run (A100: sm_80, H100/H200:
/// sm_90) with the backend's real options, on a machine with no GPU. `make test` unpacks
/// NVRTC into .cuda-tools/ (Scripts/install-nvrtc.sh) and sets MBQ_REQUIRE_NVRTC=1, so
/// there a missing NVRTC fails; a bare `swift test` without it skips, saying why.
final class KernelCompilerTests: XCTestCase {
    func compiler() throws -> KernelCompiler {
        do {
            return try KernelCompiler()
        } catch {
            if ProcessInfo.processInfo.environment["MBQ_REQUIRE_NVRTC"] == "1" { throw error }
            throw XCTSkip("NVRTC not found (\(error)); `make test` installs it")
        }
    }

    func testEveryKernelCompilesForSM80AndSM90WithoutSpills() throws {
        let nvrtc = try compiler()
        print("NVRTC \(nvrtc.version) from \(nvrtc.folder ?? "the system's library paths"), options \(KernelCompiler.options.joined(separator: " "))")
        print("kernel                   arch   registers  spill stores  spill loads  stack  ptxas ms")
        for arch in ["sm_80", "sm_90"] {
            let out = try nvrtc.compile(architecture: arch)
            XCTAssertEqual(Array(out.cubin.prefix(4)), [0x7F, 0x45, 0x4C, 0x46], "a cubin is an ELF file")
            XCTAssertEqual(Set(out.kernels.map(\.kernel)), Set(Kernel.allCases.map(\.rawValue)), out.log)
            for k in out.kernels.sorted(by: { $0.kernel < $1.kernel }) {
                print(k.kernel.padding(toLength: 24, withPad: " ", startingAt: 0), arch,
                      String(format: "%9d  %12d  %11d  %5d  %8.1f", k.registers, k.spillStores, k.spillLoads, k.stackFrame, k.compileMilliseconds))
                XCTAssertGreaterThan(k.registers, 0, "\(k.kernel) \(arch)")
                XCTAssertLessThanOrEqual(k.registers, 64, "\(k.kernel) \(arch): occupancy")
                XCTAssertEqual(k.spillStores + k.spillLoads, 0, "\(k.kernel) \(arch) spills")
            }
            print("\(arch): \(out.cubin.count) bytes of cubin in \(String(format: "%.2f", out.seconds)) s")
        }
    }

    func testACompileErrorCarriesNVRTCsLog() throws {
        let nvrtc = try compiler()
        XCTAssertThrowsError(try nvrtc.compile("extern \"C\" __global__ void k(float* x) { x[0] = undeclared; }", architecture: "sm_90")) { e in
            guard case DeviceError.compile(let arch, let log) = e else { return XCTFail("\(e)") }
            XCTAssertEqual(arch, "sm_90")
            XCTAssertTrue(log.contains("undeclared"), log)
        }
    }

    /// ptxas's report as NVRTC 13.0 writes it (copied from a compile of this source).
    func testThePtxasReportIsRead() {
        let log = """
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function 'row_error' for 'sm_90'
        ptxas info    : Function properties for row_error
        ptxas         .     0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 24 registers, used 0 barriers
        ptxas info    : Compile time = 8.822 ms
        ptxas info    : Compiling entry function 'add_bias' for 'sm_90'
        ptxas info    : Function properties for add_bias
        ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 16 registers, used 0 barriers, 384 bytes cmem[0]
        ptxas info    : Compile time = 6.028 ms
        """
        XCTAssertEqual(KernelCompiler.resources(in: log), [
            .init(kernel: "row_error", registers: 24, spillStores: 8, spillLoads: 12, stackFrame: 0, compileMilliseconds: 8.822),
            .init(kernel: "add_bias", registers: 16, spillStores: 0, spillLoads: 0, stackFrame: 16, compileMilliseconds: 6.028),
        ])
    }
}
