// swift-tools-version:6.0
// SwiftMBQ — modality-balanced quantization of the language model inside VLMs.
// Modules, one concern each: CBLAS / CZMQ (system libraries), MBQTensor (tensors,
// GEMM, kernels), MBQFormats (safetensors, HF configs, checkpoints, calibration
// bundles, packed checkpoint formats, decoder families), MBQQuant (quantizers, integer codes, bit packing),
// MBQModel (decoder blocks, forward and backward), MBQMethods (backend seam, layer step, methods, writer),
// MBQWire (the protocol, below the compute stack) / MBQMessages (the job's types as wire
// messages) / MBQCoordinator / MBQWorker / MBQCluster (distribution), mbq (the CLI).
import PackageDescription

let package = Package(
    name: "SwiftMBQ",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "mbq", targets: ["mbq"]),
        .library(name: "MBQModel", targets: ["MBQModel"]),
        .library(name: "MBQMethods", targets: ["MBQMethods"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS", pkgConfig: "openblas",
                       providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZMQ", path: "Sources/CZMQ", pkgConfig: "libzmq",
                       providers: [.apt(["libzmq3-dev"])]),
        .target(name: "MBQTensor", dependencies: ["CBLAS"]),
        .target(name: "MBQFormats", dependencies: [
            "MBQTensor", "MBQQuant", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "MBQQuant", dependencies: ["MBQTensor"]),
        .target(name: "MBQModel", dependencies: [
            "MBQTensor", "MBQFormats", "MBQQuant", .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "MBQMethods", dependencies: [
            "MBQTensor", "MBQFormats", "MBQQuant", "MBQModel", .product(name: "Logging", package: "swift-log"),
        ]),
        // GPUs as the CUDA backend sees them: one small protocol over the driver, cuBLAS and
        // NVRTC (resolved with dlopen at run time), and an emulated device on the host.
        // NVRTC compiles kernels/mbq_kernels.cuh for the GPU; this target compiles the same
        // source for the host (the emulated device) and embeds its text.
        .target(name: "CMBQKernels", path: "Sources/CMBQKernels", exclude: ["kernels"]),
        .target(name: "MBQDevice", dependencies: ["MBQTensor", "MBQModel", "MBQQuant", "CMBQKernels"]),
        // The compute backend on a device (a GPU through CUDA, or the emulated device): the
        // block passes and the search's ops on device memory, mirroring the CPU's calls.
        .target(name: "MBQCUDABackend", dependencies: ["MBQDevice", "MBQMethods", "MBQModel", "MBQQuant", "MBQTensor"]),
        // The protocol, its framing, sockets, CURVE, shared-secret auth, checksums: it
        // knows nothing of what the job computes.
        .target(name: "MBQWire", dependencies: [
            "MBQTensor", "CZMQ",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The job's types (options, search results, GPTQ reports) as wire messages.
        .target(name: "MBQMessages", dependencies: ["MBQWire", "MBQMethods", "MBQFormats"]),
        // The coordinator's policy: state machine, events, planner, cost model, journal.
        // No ZeroMQ here: it is tested without sockets.
        .target(name: "MBQCoordinator", dependencies: ["MBQWire", "MBQMessages", "MBQMethods", "MBQFormats", "MBQTensor"]),
        // A worker: its link to the coordinator, the phases on its layers, cached inputs.
        .target(name: "MBQWorker", dependencies: [
            "MBQWire", "MBQMessages", "MBQMethods", "MBQModel", "MBQFormats", "MBQQuant", "MBQTensor", "CZMQ",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The coordinator's shell (owns its socket) and the distributed job end to end.
        .target(name: "MBQCluster", dependencies: [
            "MBQWire", "MBQMessages", "MBQCoordinator", "MBQWorker", "MBQTensor", "MBQFormats", "MBQModel", "MBQMethods", "CZMQ",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "mbq", dependencies: [
            "MBQCluster", "MBQWire", "MBQCoordinator", "MBQWorker", "MBQDevice", "MBQCUDABackend",
            "MBQTensor", "MBQFormats", "MBQModel", "MBQQuant", "MBQMethods", "CBLAS", "CZMQ",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "MBQTensorTests", dependencies: ["MBQTensor"]),
        .testTarget(name: "MBQDeviceTests", dependencies: ["MBQDevice", "MBQTensor", "MBQModel", "MBQQuant", "CMBQKernels"]),
        // Reads MBQMethodsTests' fixtures by path.
        .testTarget(name: "MBQCUDABackendTests", dependencies: ["MBQCUDABackend", "MBQDevice", "MBQMethods", "MBQModel", "MBQFormats",
                                                                "MBQQuant", "MBQTensor"]),
        .testTarget(name: "MBQFormatsTests", dependencies: ["MBQFormats", "MBQTensor", "MBQModel", "MBQQuant"]),
        .testTarget(name: "MBQQuantTests", dependencies: ["MBQQuant", "MBQTensor"]),
        // Reads its fixtures (and MBQModelTests') by path: Tests/MBQMethodsTests/Fixtures.
        .testTarget(name: "MBQMethodsTests", dependencies: ["MBQMethods", "MBQModel", "MBQFormats", "MBQQuant", "MBQTensor"],
                    exclude: ["Fixtures"]),
        .testTarget(name: "MBQClusterTests", dependencies: ["MBQCluster", "MBQWire", "MBQMessages", "MBQCoordinator", "MBQWorker", "MBQMethods",
                                                            "MBQModel", "MBQFormats", "MBQTensor"]),
        .testTarget(name: "MBQCLITests", dependencies: ["mbq", "MBQCluster", "MBQWire", "MBQMessages", "MBQCoordinator", "MBQWorker", "MBQFormats",
                                                        "MBQModel", "MBQTensor"]),
        .testTarget(name: "MBQModelTests", dependencies: ["MBQModel", "MBQFormats", "MBQTensor"],
                    resources: [.copy("Fixtures")]),
    ],
    swiftLanguageModes: [.v5]
)
