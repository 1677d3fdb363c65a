import Foundation
import MBQTensor
#if canImport(Glibc)
import Glibc
#endif

/// Block inputs by layer and sample: kept from the forward pass for the backward pass (by
/// a worker for its layers, docs/DESIGN.md §3.1; by the one-process job for every layer),
/// and in the search the current layer's inputs and the outputs it makes (`LayerInputs`).
/// Tensors stay in memory while they fit `budgetBytes`; past it they go to raw fp32 files
/// under the scratch directory and are read back on use. Without a scratch directory
/// nothing spills (the plan then counted the inputs as memory), and only what `put`
/// receives is kept: `putIfRoom` keeps what the budget holds and drops the rest, for the
/// caller to recompute.
public final class ActivationStore {
    struct Key: Hashable { let layer: Int, sample: Int }

    public let budgetBytes: Int
    let directory: String?
    var memory: [Key: Tensor<Float>] = [:]
    var spilled: [Key: [Int]] = [:]   // shape of each spilled tensor
    public private(set) var residentBytes = 0
    public private(set) var spilledBytes = 0
    public private(set) var spillSeconds = 0.0
    /// Bytes ever written to scratch, across resets.
    public private(set) var lifetimeSpilledBytes = 0

    /// `scratch`: --scratch; a private subdirectory is made in it lazily
    /// and removed with the store.
    public init(budgetBytes: Int, scratch: String?, owner: String) {
        self.budgetBytes = budgetBytes
        directory = scratch.map { $0 + "/mbq-\(owner)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))" }
    }

    deinit { removeFiles() }

    func path(_ k: Key) -> String { directory! + "/L\(k.layer)-S\(k.sample).f32" }

    public func put(layer: Int, sample: Int, _ t: Tensor<Float>) throws {
        let k = Key(layer: layer, sample: sample)
        let bytes = t.count * 4
        remove(k)
        if directory == nil || residentBytes + bytes <= budgetBytes {
            memory[k] = t
            residentBytes += bytes
            return
        }
        let t0 = DispatchTime.now().uptimeNanoseconds
        defer { spillSeconds += Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9 }
        try FileManager.default.createDirectory(atPath: directory!, withIntermediateDirectories: true)
        let p = path(k)
        let fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw MethodsError.scratch(path: p, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        try t.data.withUnsafeBytes { buf in
            var done = 0
            while done < buf.count {
                let n = write(fd, buf.baseAddress! + done, buf.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw MethodsError.scratch(path: p, reason: "write: \(String(cString: strerror(errno)))") }
                done += n
            }
        }
        spilled[k] = t.shape
        spilledBytes += bytes
        lifetimeSpilledBytes += bytes
    }

    /// Keeps `t` when it fits the budget, or spills it when there is a scratch directory.
    /// -> false when it was dropped (no room, nowhere to spill).
    @discardableResult
    public func putIfRoom(layer: Int, sample: Int, _ t: Tensor<Float>) throws -> Bool {
        guard directory != nil || residentBytes + t.count * 4 <= budgetBytes else { return false }
        try put(layer: layer, sample: sample, t)
        return true
    }

    public func contains(layer: Int, sample: Int) -> Bool {
        let k = Key(layer: layer, sample: sample)
        return memory[k] != nil || spilled[k] != nil
    }

    /// Forgets every layer's inputs but `layer`'s.
    public func keepOnly(layer: Int) {
        for k in Set(memory.keys).union(spilled.keys) where k.layer != layer { remove(k) }
    }

    /// Forgets `layer`'s inputs.
    public func remove(layer: Int) {
        for k in Set(memory.keys).union(spilled.keys) where k.layer == layer { remove(k) }
    }

    func remove(_ k: Key) {
        if let t = memory.removeValue(forKey: k) { residentBytes -= t.count * 4 }
        if let shape = spilled.removeValue(forKey: k) {
            spilledBytes -= shape.reduce(1, *) * 4
            unlink(path(k))
        }
    }

    public func get(layer: Int, sample: Int) throws -> Tensor<Float> {
        let k = Key(layer: layer, sample: sample)
        if let t = memory[k] { return t }
        guard let shape = spilled[k] else {
            throw MethodsError.missingInput(layer: layer, sample: sample)
        }
        let t0 = DispatchTime.now().uptimeNanoseconds
        defer { spillSeconds += Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9 }
        let p = path(k)
        let n = shape.reduce(1, *)
        let fd = open(p, O_RDONLY)
        guard fd >= 0 else { throw MethodsError.scratch(path: p, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        var failure: String?
        let data = [Float](unsafeUninitializedCapacity: n) { buf, count in
            let raw = UnsafeMutableRawBufferPointer(buf)
            var done = 0
            while done < raw.count {
                let r = read(fd, raw.baseAddress! + done, raw.count - done)
                if r < 0 && errno == EINTR { continue }
                guard r > 0 else { failure = r == 0 ? "file is short" : String(cString: strerror(errno)); break }
                done += r
            }
            if failure != nil { raw.initializeMemory(as: UInt8.self, repeating: 0) }
            count = n
        }
        if let failure { throw MethodsError.scratch(path: p, reason: failure) }
        return Tensor(shape: shape, data: data)
    }

    /// Forgets everything (a new plan or a new forward pass).
    public func reset() {
        memory = [:]
        spilled = [:]
        residentBytes = 0
        spilledBytes = 0
        removeFiles()
    }

    public func removeFiles() {
        if let d = directory { try? FileManager.default.removeItem(atPath: d) }
    }
}
