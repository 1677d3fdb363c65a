/// A fast 64-bit checksum of tensor bytes (8 bytes a step, multiply-xorshift mixing):
/// catches truncated, reordered or corrupted frames at several GB/s. Not cryptographic;
/// authentication is the transport's job (CURVE / shared secret).
public enum Checksum64 {
    public static func of(_ buf: UnsafeRawBufferPointer) -> UInt64 {
        var h: UInt64 = 0x9E37_79B9_7F4A_7C15 ^ UInt64(buf.count)
        let words = buf.count / 8
        var i = 0
        // Four independent lanes keep the multiplier pipeline busy.
        var a = h, b = h &+ 1, c = h &+ 2, d = h &+ 3
        while i + 4 <= words {
            a = mix(a ^ buf.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
            b = mix(b ^ buf.loadUnaligned(fromByteOffset: 8 * (i + 1), as: UInt64.self))
            c = mix(c ^ buf.loadUnaligned(fromByteOffset: 8 * (i + 2), as: UInt64.self))
            d = mix(d ^ buf.loadUnaligned(fromByteOffset: 8 * (i + 3), as: UInt64.self))
            i += 4
        }
        h = mix(a ^ (b &* 3) ^ (c &* 5) ^ (d &* 7))
        while i < words {
            h = mix(h ^ buf.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))
            i += 1
        }
        var tail: UInt64 = 0
        for j in (8 * words)..<buf.count { tail = (tail << 8) | UInt64(buf[j]) }
        return mix(h ^ tail)
    }

    @inline(__always) static func mix(_ x: UInt64) -> UInt64 {
        var z = x &* 0xBF58_476D_1CE4_E5B9
        z ^= z >> 31
        return z &* 0x94D0_49BB_1331_11EB
    }

    public static func of(_ bytes: [UInt8]) -> UInt64 { bytes.withUnsafeBytes { of($0) } }
}
