/// fp32 values (or raw bytes) in device memory, freed with the last reference: what the
/// ops and the conformance hold between launches.
public final class DeviceArray: @unchecked Sendable {
    public let device: Device
    public let pointer: DevicePointer
    /// Elements of 4 bytes (fp32, int32) the allocation holds.
    public let count: Int

    public init(_ device: Device, count: Int) throws {
        self.device = device
        self.count = count
        pointer = try device.allocate(max(1, count) * 4)
    }

    /// fp32 values up to the device.
    public convenience init(_ device: Device, _ values: [Float]) throws {
        try self.init(device, count: values.count)
        try values.withUnsafeBytes { try device.copy($0, to: pointer) }
    }

    /// int32 values (masks) up to the device.
    public convenience init(_ device: Device, int32 values: [Int32]) throws {
        try self.init(device, count: values.count)
        try values.withUnsafeBytes { try device.copy($0, to: pointer) }
    }

    /// Integers as int64 (the kernels' index arrays), two element slots each.
    public convenience init(_ device: Device, int64 values: [Int]) throws {
        try self.init(device, count: 2 * values.count)
        try values.map(Int64.init).withUnsafeBytes { try device.copy($0, to: pointer) }
    }

    /// 16-bit values (bf16 or fp16 bits, two per element slot) up to the device.
    public convenience init(_ device: Device, bits values: [UInt16]) throws {
        try self.init(device, count: (values.count + 1) / 2)
        try values.withUnsafeBytes { try device.copy($0, to: pointer) }
    }

    deinit { try? device.free(pointer) }

    /// The values back on the host (after the stream's work).
    public func download() throws -> [Float] { try device.download(pointer, count: count) }

    /// The address `elements` fp32 values in.
    public func at(_ elements: Int) -> DevicePointer { pointer + UInt64(elements * 4) }
}
