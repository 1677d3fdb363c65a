import CMBQKernels
import Foundation
import MBQDevice
import MBQTensor
import XCTest

/// The per-op conformance on the emulated device (each kernel's own source run on the
/// host), the kernels' three name lists agreeing, and the suite failing, by name and
/// index, on a device whose one op is wrong.
final class OpConformanceTests: XCTestCase {
    func testEveryOpOnTheEmulatedDeviceMatchesTheCPU() throws {
        let checks = try OpConformance.run(on: EmulatedDevice())
        for c in checks { print(c) }
        XCTAssertGreaterThanOrEqual(checks.count, 30)
        for c in checks { XCTAssertTrue(c.passed, c.description) }
        // The kernels are the CPU's arithmetic in the CPU's order: bit-identical on the host.
        for c in checks where c.tolerance == OpConformance.exact { XCTAssertEqual(c.maxAbs, 0, c.description) }
    }

    /// The source's MBQ_KERNEL declarations, the host build's launch table and Swift's
    /// `Kernel` name the same kernels.
    func testKernelListsAgree() {
        let declared = Kernel.declared(in: Kernel.source)
        let host = (0..<mbq_host_kernel_count()).map { String(cString: mbq_host_kernel_name($0)) }
        XCTAssertEqual(Set(declared), Set(Kernel.allCases.map(\.rawValue)))
        XCTAssertEqual(declared.count, Kernel.allCases.count)
        XCTAssertEqual(Set(host), Set(declared))
        XCTAssertEqual(host.count, declared.count)
        XCTAssertEqual(mbq_host_kernel_index("no_such_kernel"), -1)
    }

    /// A device whose RMSNorm forward writes one wrong element: the suite fails that op
    /// alone (the backward reads the device's own inverse RMS, which is right), naming its
    /// shapes and the element.
    func testAWrongOpIsNamedWithItsFirstDeviation() throws {
        let checks = try OpConformance.run(on: FaultyDevice())
        let failed = checks.filter { !$0.passed }
        XCTAssertEqual(Set(failed.map(\.op)), ["rmsnorm forward"], failed.map(\.description).joined(separator: "\n"))
        let forward = try XCTUnwrap(failed.first { $0.op == "rmsnorm forward" && $0.shapes == "[37, 96]" })
        XCTAssertTrue(forward.firstDeviation?.hasPrefix("[2, 5] (") ?? false, forward.description)
        XCTAssertEqual(failed.count, 2)   // both shapes
        XCTAssertTrue(forward.description.hasPrefix("FAIL rmsnorm forward [37, 96]"), forward.description)
    }

    func testLaunchRejectsAPointerOutsideEveryAllocation() throws {
        let dev = EmulatedDevice()
        let x = try DeviceArray(dev, [1, 2, 3])
        XCTAssertThrowsError(try dev.launch(.addInPlace, LaunchShape(threads: 3), [.pointer(x.pointer), .pointer(x.pointer + 4096), .int64(3)])) {
            XCTAssertTrue("\($0)".contains("launch add_inplace argument 1"), "\($0)")
        }
    }
}

/// The emulated device with one element of every RMSNorm forward's output changed
/// (row 2, column 5), as an indexing bug would.
final class FaultyDevice: Device, @unchecked Sendable {
    let base = EmulatedDevice()
    var name: String { "faulty" }
    func allocate(_ bytes: Int) throws -> DevicePointer { try base.allocate(bytes) }
    func free(_ p: DevicePointer) throws { try base.free(p) }
    func copy(_ host: UnsafeRawBufferPointer, to p: DevicePointer) throws { try base.copy(host, to: p) }
    func copy(_ p: DevicePointer, to host: UnsafeMutableRawBufferPointer) throws { try base.copy(p, to: host) }
    func copy(_ from: DevicePointer, to: DevicePointer, bytes: Int) throws { try base.copy(from, to: to, bytes: bytes) }
    func gemm(_ g: GEMM) throws { try base.gemm(g) }
    func gemmStridedBatched(_ g: GEMM, strideA: Int, strideB: Int, strideC: Int, batch: Int) throws {
        try base.gemmStridedBatched(g, strideA: strideA, strideB: strideB, strideC: strideC, batch: batch)
    }
    func memoryInfo() throws -> DeviceMemoryInfo { try base.memoryInfo() }
    func synchronize() throws {}
    func launch(_ kernel: Kernel, _ shape: LaunchShape, _ arguments: [KernelArgument]) throws {
        try base.launch(kernel, shape, arguments)
        if kernel == .rmsNormForward, case .pointer(let y) = arguments[0], case .int64(let cols) = arguments[5] {
            let at = y + UInt64((2 * cols + 5) * 4)
            var v: Float = 0
            try withUnsafeMutableBytes(of: &v) { try base.copy(at, to: $0) }
            v += 0.5
            try withUnsafeBytes(of: &v) { try base.copy($0, to: at) }
        }
    }
}
