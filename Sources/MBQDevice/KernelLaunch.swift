import CMBQKernels

/// One parameter of a kernel launch, typed as the kernel declares it
/// (kernels/mbq_kernels.cuh): device pointers and sizes are 64-bit, `int` flags and bit
/// widths 32-bit, scalars fp32.
public enum KernelArgument: Sendable, Equatable {
    case pointer(DevicePointer)   // T* (0 is a null pointer)
    case int64(Int)               // long long
    case int32(Int32)             // int
    case float(Float)             // float
}

/// The kernels in the source, by the name both compilers give them (extern "C" on the
/// GPU, so cuModuleGetFunction finds them unmangled).
public enum Kernel: String, CaseIterable, Sendable {
    case widenBF16 = "widen_bf16", widenF16 = "widen_f16"
    case rmsNormForward = "rmsnorm_forward", rmsNormBackward = "rmsnorm_backward"
    case ropeForward = "rope_forward", ropeBackward = "rope_backward"
    case swigluForward = "swiglu_forward", swigluBackward = "swiglu_backward"
    case softmaxCausal = "softmax_causal", attentionBackwardRows = "attention_backward_rows"
    case fakeQuantRows = "fake_quant_rows", fakeQuantGroups = "fake_quant_groups"
    case scaleColumns = "scale_columns", addInPlace = "add_inplace", broadcastRows = "broadcast_rows", fill
    case gatherRows = "gather_rows", columnAbsSums = "column_abs_sums"
    case rowError = "row_error"
    case logSoftmaxRows = "log_softmax_rows", expInPlace = "exp_inplace", scale
    case pickPerRow = "pick_per_row", addPerRow = "add_per_row", scatterRows = "scatter_rows"

    /// The source NVRTC compiles and the emulated device runs (compiled for the host).
    public static var source: String { String(cString: mbq_kernel_source()) }

    /// Names declared `MBQ_KERNEL` in `source`, in order.
    public static func declared(in source: String) -> [String] {
        source.split(separator: "\n").compactMap { line -> String? in
            guard line.hasPrefix("MBQ_KERNEL ") else { return nil }
            let rest = line.dropFirst("MBQ_KERNEL ".count)
            return rest.split(separator: "(").first.map { String($0).trimmingCharacters(in: .whitespaces) }
        }
    }
}

/// A 1-D launch covering `threads` threads in blocks of `blockSize` (the kernels' launch
/// contract: thread i = blockIdx.x * blockDim.x + threadIdx.x; threads past the count return).
public struct LaunchShape: Sendable, Equatable {
    public var blocks: Int
    public var blockSize: Int

    public init(threads: Int, blockSize: Int = 256) {
        precondition(threads > 0 && blockSize > 0, "a launch of \(threads) threads in blocks of \(blockSize)")
        self.blockSize = blockSize
        blocks = (threads + blockSize - 1) / blockSize
    }
}

/// cuLaunchKernel's parameter array: each parameter's value in its own 8-byte slot and a
/// pointer to every slot, valid inside `body`.
func withKernelParameters<R>(_ arguments: [KernelArgument], _ body: (UnsafeMutablePointer<UnsafeMutableRawPointer?>) throws -> R) rethrows -> R {
    let slots = UnsafeMutableRawPointer.allocate(byteCount: max(1, arguments.count) * 8, alignment: 8)
    let pointers = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(1, arguments.count))
    defer { slots.deallocate(); pointers.deallocate() }
    for (i, a) in arguments.enumerated() {
        let slot = slots + i * 8
        switch a {
        case .pointer(let p): slot.storeBytes(of: p, as: UInt64.self)
        case .int64(let v): slot.storeBytes(of: Int64(v), as: Int64.self)
        case .int32(let v): slot.storeBytes(of: v, as: Int32.self)
        case .float(let v): slot.storeBytes(of: v, as: Float.self)
        }
        pointers[i] = slot
    }
    return try body(pointers)
}
