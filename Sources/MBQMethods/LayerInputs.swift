import MBQFormats
import MBQModel
import MBQTensor

/// The search's walk over consecutive layers (docs/DESIGN.md §1): the inputs of
/// the layer being searched, every sample's, and the outputs it makes, which are the next
/// layer's inputs. Both live in an `ActivationStore` (in memory within its budget, past it
/// in --scratch), so that a job holds two layers' inputs at most, however many layers it
/// searches: the one-process job for the whole model, a worker for its stage, whose
/// first layer's inputs are what its forward phase received.
public final class LayerInputs {
    let store: ActivationStore
    let backend: ComputeBackend
    let samples: Int
    /// The layer whose inputs `input` gives.
    public private(set) var layer: Int

    /// `store` holds `layer`'s inputs for samples 0..<samples; whatever else it holds
    /// (the forward phase's other layers) is dropped.
    public init(layer: Int, samples: Int, store: ActivationStore, backend: ComputeBackend) {
        store.keepOnly(layer: layer)
        self.store = store
        self.backend = backend
        self.samples = samples
        self.layer = layer
    }

    /// Sample `s`'s input to `layer`. x: [T, C]
    public func input(_ s: Int) throws -> BackendTensor {
        try backend.upload(try store.get(layer: layer, sample: s))
    }

    /// Sample `s`'s output of `layer`, the next layer's input. y: [T, C]
    public func keepOutput(_ s: Int, _ y: BackendTensor) throws {
        try store.put(layer: layer + 1, sample: s, try backend.download(y))
    }

    /// Moves to the next layer: its inputs are the outputs kept; this layer's go.
    public func advance() throws {
        for s in 0..<samples where !store.contains(layer: layer + 1, sample: s) {
            throw MethodsError.missingInput(layer: layer + 1, sample: s)
        }
        store.remove(layer: layer)
        layer += 1
    }

    /// The block run on every sample (no captures), each output kept: a layer whose
    /// search is already done (a re-plan, a resume) or one that needs none (rtn).
    public func forward(_ b: BackendBlock, samples: [CalibrationSample], rope: (CalibrationSample) -> RoPETable<Float>,
                        actBits: Int? = nil) throws {
        for (i, s) in samples.enumerated() {
            try keepOutput(i, try backend.blockForward(try input(i), b, rope: rope(s), mask: s.attention, save: false,
                                                      capture: false, actBits: actBits).output)
        }
    }
}
