import ArgumentParser
import MBQCUDABackend
import MBQDevice
import MBQMethods

/// The compute backend `--device` names: cpu (OpenBLAS), cuda / cuda:N (a GPU through
/// libcuda, cuBLAS and NVRTC, found at run time) or cuda-emulated (the CUDA backend's
/// kernels and products run on the host). The device opens here, before anything is
/// read or written, so that a machine without a driver gets one line naming libcuda and
/// MBQ_CUDA_LIBS, and nothing else happens. `storedPrecision`: the CPU keeps a bf16
/// checkpoint's layers in bf16 (the workers, which hold their layers for the whole job).
/// `precision`: the GPU's GEMMs, strict (fp32) or bf16 (`GEMMPrecision`); the CPU has only strict.
func computeBackend(_ device: String, storedPrecision: Bool, precision: GEMMPrecision = .strict) throws -> ComputeBackend {
    guard let d = try DeviceSelection(parsing: device).open() else {
        guard precision == .strict else { throw ValidationError("--precision bf16 needs a CUDA device (--device cuda...)") }
        return CPUBackend(keepStoredPrecision: storedPrecision)
    }
    return CUDABackend(device: d, precision: precision)
}

extension GEMMPrecision: ExpressibleByArgument {}

/// The --device of local worker `i` of a one-machine cluster: with `cuda`, worker i on GPU i.
func localWorkerDevice(_ device: String, worker i: Int) throws -> String {
    try DeviceSelection(parsing: device) == .cuda(ordinal: 0) && device == "cuda" ? "cuda:\(i)" : device
}
