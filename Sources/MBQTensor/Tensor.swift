/// A dense, contiguous, row-major tensor. Value semantics through `Array` (copy on
/// write); the engine's kernels work on its storage through unsafe buffer pointers.
public struct Tensor<T: BLASScalar>: Sendable {
    public private(set) var shape: [Int]
    public var data: [T]

    @inlinable public var count: Int { data.count }
    @inlinable public var rank: Int { shape.count }

    public init(shape: [Int], data: [T]) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        precondition(shape.reduce(1, *) == data.count,
                     "shape \(shape) needs \(shape.reduce(1, *)) elements, got \(data.count)")
        self.shape = shape
        self.data = data
    }

    @inlinable
    public init(zeros shape: [Int]) {
        self.init(shape: shape, data: [T](repeating: 0, count: shape.reduce(1, *)))
    }

    /// Storage left uninitialized: only for outputs that are fully written next (GEMM
    /// with beta = 0), where zero-filling would cost a pass over memory.
    @inlinable
    public init(uninitialized shape: [Int]) {
        let n = shape.reduce(1, *)
        self.init(shape: shape, data: [T](unsafeUninitializedCapacity: n) { _, count in count = n })
    }

    @inlinable
    public init(shape: [Int], repeating value: T) {
        self.init(shape: shape, data: [T](repeating: value, count: shape.reduce(1, *)))
    }

    /// Same storage, new shape with the same element count.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        Tensor(shape: newShape, data: data)
    }

    /// Size of dimension `i`, negative indices from the end.
    @inlinable public func dim(_ i: Int) -> Int { shape[i < 0 ? shape.count + i : i] }

    /// Rows when viewed as a matrix [count / lastDim, lastDim].
    @inlinable public var rows: Int { shape.isEmpty ? 1 : count / Swift.max(1, shape[shape.count - 1]) }
    @inlinable public var cols: Int { shape.last ?? 1 }

    /// Rows [start, start + n) of the matrix view, as a new tensor [n, cols].
    public func rowSlice(_ start: Int, _ n: Int) -> Tensor {
        let c = cols
        return Tensor(shape: [n, c], data: Array(data[(start * c)..<((start + n) * c)]))
    }

    /// Converts element type (e.g. Float -> Double for finite-difference checks).
    public func converted<U: BLASScalar>(to _: U.Type) -> Tensor<U> {
        Tensor<U>(shape: shape, data: data.map { U($0) })
    }

    /// Largest |a - b| and the largest |a - b| / max(|b|, floor) over all elements.
    public func maxDifference(to other: Tensor, relativeFloor: T = 1e-6) -> (abs: T, rel: T) {
        precondition(shape == other.shape, "shape \(shape) vs \(other.shape)")
        var a: T = 0, r: T = 0
        for i in 0..<count {
            let d = Swift.abs(data[i] - other.data[i])
            a = Swift.max(a, d)
            r = Swift.max(r, d / Swift.max(Swift.abs(other.data[i]), relativeFloor))
        }
        return (a, r)
    }
}
