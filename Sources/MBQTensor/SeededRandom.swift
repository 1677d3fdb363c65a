/// A small deterministic generator (SplitMix64) so that demo checkpoints and test
/// inputs come out bit-identical on every machine and Swift version.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func uniform() -> Double { Double(next() >> 11) * 0x1.0p-53 }

    /// Standard normal (Box-Muller).
    public mutating func normal() -> Double {
        let u1 = Swift.max(uniform(), 1e-300), u2 = uniform()
        return (-2 * _log(u1)).squareRoot() * _cos(2 * Double.pi * u2)
    }

    /// A tensor of N(0, std^2) entries.
    public mutating func normalTensor<T: BLASScalar>(_ shape: [Int], std: Double = 1, as _: T.Type = T.self) -> Tensor<T> {
        let n = shape.reduce(1, *)
        var data = [T](repeating: 0, count: n)
        for i in 0..<n { data[i] = T(normal() * std) }
        return Tensor(shape: shape, data: data)
    }
}

@inline(__always) private func _log(_ x: Double) -> Double { Double.log(x) }
@inline(__always) private func _cos(_ x: Double) -> Double { Double.cos(x) }
