/// bf16 and IEEE fp16 <-> fp32 conversions, bit-exact with PyTorch's (round to nearest
/// even; NaN stays NaN). Written out by hand so that they run the same on every x86 and
/// ARM target whatever `Float16` support the toolchain has.
public enum HalfPrecision {
    /// bf16 is the upper half of an fp32.
    @inlinable public static func bf16ToFloat(_ h: UInt16) -> Float {
        Float(bitPattern: UInt32(h) << 16)
    }

    @inlinable public static func floatToBF16(_ f: Float) -> UInt16 {
        let bits = f.bitPattern
        if f.isNaN { return UInt16(truncatingIfNeeded: (bits >> 16) | 0x0040) }
        let rounding = UInt32(0x7FFF) + ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
    }

    @inlinable public static func fp16ToFloat(_ h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exp = UInt32((h >> 10) & 0x1F)
        let man = UInt32(h & 0x3FF)
        if exp == 0 {
            if man == 0 { return Float(bitPattern: sign) }
            // Subnormal: value = man * 2^-24.
            let v = Float(man) * Float(bitPattern: 0x3380_0000)  // 2^-24
            return sign != 0 ? -v : v
        }
        if exp == 0x1F {
            return Float(bitPattern: sign | 0x7F80_0000 | (man << 13))
        }
        return Float(bitPattern: sign | ((exp + 112) << 23) | (man << 13))
    }

    @inlinable public static func floatToFP16(_ f: Float) -> UInt16 {
        let bits = f.bitPattern
        let sign = UInt16((bits >> 16) & 0x8000)
        let absBits = bits & 0x7FFF_FFFF
        if absBits >= 0x7F80_0000 {  // Inf or NaN
            return sign | 0x7C00 | (absBits > 0x7F80_0000 ? 0x200 : 0)
        }
        if absBits < 0x3880_0000 {  // below 2^-14: subnormal or zero in fp16
            // value / 2^-24, rounded to nearest even.
            let v = Float(bitPattern: absBits) * Float(bitPattern: 0x4B80_0000)  // * 2^24
            let r = v.rounded(.toNearestOrEven)
            return sign | UInt16(r)
        }
        // Normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even).
        var h = (absBits &- 0x3800_0000) >> 13  // exponent rebias (127-15)<<23
        let rem = absBits & 0x1FFF
        if rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1) { h &+= 1 }
        if h >= 0x7C00 { return sign | 0x7C00 }
        return sign | UInt16(h)
    }
}
