import Foundation

/// Where the CUDA libraries are found at run time, with no toolkit at build time
/// (../shared/CUDA.md, "Loading"): each is dlopen'ed by its soname from, in order,
///   1. `$MBQ_CUDA_LIBS` (a folder, or several separated by ':'),
///   2. the system's loader paths (ldconfig, LD_LIBRARY_PATH; the driver's libcuda.so.1 lives there),
///   3. the `nvidia-*` pip wheels' `lib` folders (`nvidia/<package>/lib` and `nvidia/cu13/lib`) under
///      `$VIRTUAL_ENV`, the repository's `.venv`, `~/.local` and the system's Python site- and
///      dist-packages.
public enum CUDALibraries {
    public static let driver = "libcuda.so.1"
    public static let cublas = "libcublas.so.13"
    public static let cublasLt = "libcublasLt.so.13"
    public static let nvrtc = "libnvrtc.so.13"
    public static let environmentVariable = "MBQ_CUDA_LIBS"

    /// The folders searched before and after the system's paths, in order.
    public static func folders(environment: [String: String] = ProcessInfo.processInfo.environment)
        -> (before: [String], wheels: [String]) {
        let before = (environment[environmentVariable] ?? "").split(separator: ":").map(String.init).filter { !$0.isEmpty }
        var roots: [String] = []
        if let v = environment["VIRTUAL_ENV"] { roots.append(v + "/lib") }
        roots.append(FileManager.default.currentDirectoryPath + "/.venv/lib")
        if let h = environment["HOME"] { roots.append(h + "/.local/lib") }
        roots += ["/usr/local/lib", "/usr/lib"]
        var wheels: [String] = []
        let fm = FileManager.default
        for root in roots {
            for py in ((try? fm.contentsOfDirectory(atPath: root)) ?? []).filter({ $0.hasPrefix("python3") }).sorted() {
                for packages in ["site-packages", "dist-packages"] {
                    let nvidia = "\(root)/\(py)/\(packages)/nvidia"
                    for pkg in ((try? fm.contentsOfDirectory(atPath: nvidia)) ?? []).sorted() {
                        let lib = "\(nvidia)/\(pkg)/lib"
                        if fm.fileExists(atPath: lib) { wheels.append(lib) }
                    }
                }
            }
        }
        return (before, wheels)
    }

    /// dlopen's handle of `library` from the first place that has it, and where that was
    /// (nil for the loader's own search); else one error naming the library, every place
    /// searched and how to point at it.
    public static func open(_ library: String, environment: [String: String] = ProcessInfo.processInfo.environment,
                            flags: Int32 = RTLD_NOW | RTLD_LOCAL) throws -> (handle: UnsafeMutableRawPointer, folder: String?) {
        let (before, wheels) = folders(environment: environment)
        for folder in before {
            if let h = dlopen(folder + "/" + library, flags) { return (h, folder) }
        }
        if let h = dlopen(library, flags) { return (h, nil) }
        for folder in wheels {
            if let h = dlopen(folder + "/" + library, flags) { return (h, folder) }
        }
        let hint = library == driver
            ? "it comes with the NVIDIA driver; on a machine with a GPU set \(environmentVariable) to the folder that holds it"
            : "install the nvidia-* wheels (pip install nvidia-cublas nvidia-cuda-nvrtc, 13.0.x) or set \(environmentVariable) to the folder that holds it"
        throw DeviceError.libraryNotFound(library: library, searched: before.map { "\(environmentVariable) \($0)" } + ["the system's library paths"] + wheels,
                                          hint: hint)
    }
}
