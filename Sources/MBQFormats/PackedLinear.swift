import Foundation
import MBQQuant
import MBQTensor

/// One linear layer's weight in each checkpoint format: the tensors written for it and
/// how they are read back into codes (docs/FORMATS.md; ../shared/FORMATS.md has the
/// layouts as compressed-tensors, AutoAWQ and GPTQ define them). `module` is the
/// linear's name without ".weight", e.g. "model.layers.0.self_attn.q_proj".
public enum PackedLinear {
    /// compressed-tensors' sub-format for a weight scheme: W8 symmetric per channel is
    /// `int-quantized` (W8A8), everything else `pack-quantized`.
    public static func compressedPacking(bits: Int, symmetric: Bool) -> String {
        bits == 8 && symmetric ? "int-quantized" : "pack-quantized"
    }

    /// The tensor names that replace `module.weight` in `format`.
    public static func tensorNames(module m: String, format: CheckpointFormat, bits: Int, symmetric: Bool) -> [String] {
        switch format {
        case .fake: return [m + ".weight"]
        case .compressedTensors:
            if compressedPacking(bits: bits, symmetric: symmetric) == "int-quantized" { return [m + ".weight", m + ".weight_scale"] }
            return [m + ".weight_packed", m + ".weight_scale", m + ".weight_shape"] + (symmetric ? [] : [m + ".weight_zero_point"])
        case .awq: return [m + ".qweight", m + ".qzeros", m + ".scales"]
        case .gptq: return [m + ".qweight", m + ".qzeros", m + ".scales", m + ".g_idx"]
        }
    }

    /// Why `format` cannot hold a weight of this scheme and shape, or nil when it can.
    public static func unsupported(format: CheckpointFormat, bits: Int, group: Int, symmetric: Bool,
                                   rows: Int, cols: Int) -> String? {
        switch format {
        case .fake: return nil
        case .compressedTensors:
            guard 32 % bits == 0 else {
                return "\(bits)-bit codes: compressed-tensors <= 0.17 pads them and >= 0.18 packs them densely, so no one layout loads everywhere (use --format gptq)"
            }
            return nil
        case .awq:
            if symmetric || bits != 4 || group <= 0 { return "AutoAWQ GEMM holds 4-bit asymmetric group-wise weights only" }
            if rows % 8 != 0 { return "AutoAWQ packs 8 output channels per word: \(rows) outputs" }
            return nil
        case .gptq:
            if symmetric { return "GPTQ output is written for the asymmetric weight-only scheme" }
            if ![2, 3, 4, 8].contains(bits) { return "GPTQ holds 2, 3, 4 or 8 bits" }
            if (cols * bits) % 32 != 0 || (rows * bits) % 32 != 0 {
                return "GPTQ packs whole 32-bit words along both dimensions: [\(rows), \(cols)] at \(bits) bits"
            }
            return nil
        }
    }

    /// Adds `q`'s tensors for `module` to `w`, scales in `scaleDType`. The fake format
    /// stores the dequantized weight in `scaleDType` (the model's dtype).
    public static func add(_ q: QuantizedWeight, module m: String, format: CheckpointFormat, scaleDType: DType,
                           to w: inout SafetensorsWriter) {
        let gpr = q.groupsPerRow
        switch format {
        case .fake:
            w.add(m + ".weight", q.dequantized(precision: scaleDType.scalePrecision), as: scaleDType)
        case .compressedTensors:
            w.add(m + ".weight_scale", floats: q.scales, shape: [q.rows, gpr], as: scaleDType)
            if compressedPacking(bits: q.bits, symmetric: q.symmetric) == "int-quantized" {
                let off = 1 << (q.bits - 1)
                w.add(m + ".weight", int8: q.codes.map { Int8(Int($0) - off) }, shape: [q.rows, q.cols])
            } else {
                w.add(m + ".weight_packed", int32: BitPacking.packRows(q.codes, rows: q.rows, cols: q.cols, bits: q.bits),
                      shape: [q.rows, BitPacking.words(q.cols, bits: q.bits)])
                w.add(m + ".weight_shape", int64: [Int64(q.rows), Int64(q.cols)], shape: [2])
                if !q.symmetric {
                    w.add(m + ".weight_zero_point", int32: BitPacking.packColumns(q.zeros, rows: q.rows, cols: gpr, bits: q.bits),
                          shape: [BitPacking.words(q.rows, bits: q.bits), gpr])
                }
            }
        case .awq:
            // [in, out/8], [in/g, out/8], [in/g, out]: AutoAWQ stores the transpose.
            w.add(m + ".qweight", int32: BitPacking.packAWQ(transpose(q.codes, q.rows, q.cols), rows: q.cols, cols: q.rows),
                  shape: [q.cols, q.rows / 8])
            w.add(m + ".qzeros", int32: BitPacking.packAWQ(transpose(q.zeros, q.rows, gpr), rows: gpr, cols: q.rows),
                  shape: [gpr, q.rows / 8])
            w.add(m + ".scales", floats: transpose(q.scales, q.rows, gpr), shape: [gpr, q.rows], as: .f16)
        case .gptq:
            // qweight: a stream down each output column of [in, out]; qzeros: along each
            // group row of [in/g, out].
            w.add(m + ".qweight", int32: BitPacking.packRowsTransposed(q.codes, rows: q.rows, cols: q.cols, bits: q.bits),
                  shape: [BitPacking.words(q.cols, bits: q.bits), q.rows])
            w.add(m + ".qzeros", int32: BitPacking.packRows(transpose(q.zeros, q.rows, gpr), rows: gpr, cols: q.rows, bits: q.bits),
                  shape: [gpr, BitPacking.words(q.rows, bits: q.bits)])
            w.add(m + ".scales", floats: transpose(q.scales, q.rows, gpr), shape: [gpr, q.rows], as: .f16)
            // Each input's group: i / g, or where GPTQ's activation order put it (desc_act).
            w.add(m + ".g_idx", int32: q.groupIndices, shape: [q.cols])
        }
    }

    /// Reads `module`'s codes back ([rows, cols] = [out, in]), checking every tensor's
    /// dtype, shape and value range; errors name the tensor at fault.
    public static func read(module m: String, rows: Int, cols: Int, quant qc: CheckpointQuantization,
                            from ckpt: Checkpoint) throws -> QuantizedWeight {
        let b = qc.bits
        let g = qc.group > 0 ? qc.group : cols
        guard cols % g == 0 else {
            throw FormatsError.invalidConfig(path: ckpt.directory + "/config.json", reason: "group_size \(g) does not divide \(m)'s \(cols) inputs")
        }
        let gpr = cols / g
        let maxCode = (1 << b) - 1
        func checkRange(_ v: [UInt8], _ name: String, max: Int) throws {
            if let i = v.firstIndex(where: { Int($0) > max }) {
                throw FormatsError.invalidTensorEntry(path: try ckpt.entry(name).file.path, tensor: name,
                                                      reason: "code \(v[i]) at flat index \(i) is out of range for \(b) bits")
            }
        }
        switch qc.format {
        case .fake:
            throw FormatsError.invalidConfig(path: ckpt.directory, reason: "fake-quantized weights are read as plain tensors")
        case .compressedTensors:
            let scales = try ckpt.scales(m + ".weight_scale", shape: [rows, gpr])
            if qc.packing == "int-quantized" {
                let name = m + ".weight"
                let v = try ckpt.integers(name, dtype: .i8, shape: [rows, cols])
                let half = 1 << (b - 1)
                if let i = v.firstIndex(where: { $0 < -half || $0 >= half }) {
                    throw FormatsError.invalidTensorEntry(path: try ckpt.entry(name).file.path, tensor: name,
                                                          reason: "value \(v[i]) at flat index \(i) is out of range for \(b) bits")
                }
                return QuantizedWeight(rows: rows, cols: cols, bits: b, group: g, symmetric: true,
                                       codes: v.map { UInt8(Int($0) + half) }, scales: scales,
                                       zeros: [UInt8](repeating: UInt8(half), count: rows * gpr))
            }
            let shapeName = m + ".weight_shape"
            let stored = try ckpt.integers(shapeName, dtype: nil, shape: [2])
            guard stored == [Int64(rows), Int64(cols)] else {
                throw FormatsError.invalidTensorEntry(path: try ckpt.entry(shapeName).file.path, tensor: shapeName,
                                                      reason: "says \(stored), the config gives [\(rows), \(cols)]")
            }
            let packed = try ckpt.integers(m + ".weight_packed", dtype: .i32, shape: [rows, BitPacking.words(cols, bits: b)])
            let codes = BitPacking.unpackRows(packed.map { Int32(truncatingIfNeeded: $0) }, rows: rows, cols: cols, bits: b)
            var zeros = [UInt8](repeating: UInt8(1 << (b - 1)), count: rows * gpr)
            if !qc.symmetric {
                let zp = try ckpt.integers(m + ".weight_zero_point", dtype: .i32, shape: [BitPacking.words(rows, bits: b), gpr])
                zeros = BitPacking.unpackColumns(zp.map { Int32(truncatingIfNeeded: $0) }, rows: rows, cols: gpr, bits: b)
            }
            return QuantizedWeight(rows: rows, cols: cols, bits: b, group: g, symmetric: qc.symmetric,
                                   codes: codes, scales: scales, zeros: zeros)
        case .awq:
            guard rows % 8 == 0 else {
                throw FormatsError.invalidTensorEntry(path: ckpt.directory, tensor: m + ".qweight", reason: "\(rows) outputs is not a multiple of 8")
            }
            let qw = try ckpt.integers(m + ".qweight", dtype: .i32, shape: [cols, rows / 8])
            let qz = try ckpt.integers(m + ".qzeros", dtype: .i32, shape: [gpr, rows / 8])
            let s = try ckpt.scales(m + ".scales", shape: [gpr, rows])
            return QuantizedWeight(rows: rows, cols: cols, bits: 4, group: g, symmetric: false,
                                   codes: transpose(BitPacking.unpackAWQ(qw.map { Int32(truncatingIfNeeded: $0) }, rows: cols, cols: rows), cols, rows),
                                   scales: transpose(s, gpr, rows),
                                   zeros: transpose(BitPacking.unpackAWQ(qz.map { Int32(truncatingIfNeeded: $0) }, rows: gpr, cols: rows), gpr, rows))
        case .gptq:
            let qw = try ckpt.integers(m + ".qweight", dtype: .i32, shape: [BitPacking.words(cols, bits: b), rows])
            let qz = try ckpt.integers(m + ".qzeros", dtype: .i32, shape: [gpr, BitPacking.words(rows, bits: b)])
            let s = try ckpt.scales(m + ".scales", shape: [gpr, rows])
            // g_idx: each input's group. In order (i / g) unless desc_act reordered them.
            var gIdx: [Int32]? = nil
            if ckpt.contains(m + ".g_idx") {
                let gi = try ckpt.integers(m + ".g_idx", dtype: nil, shape: [cols])
                if let i = gi.indices.first(where: { gi[$0] < 0 || gi[$0] >= Int64(gpr) }) {
                    throw FormatsError.invalidTensorEntry(path: try ckpt.entry(m + ".g_idx").file.path, tensor: m + ".g_idx",
                                                          reason: "input \(i) is in group \(gi[i]); there are \(gpr)")
                }
                if gi.indices.contains(where: { gi[$0] != Int64($0 / g) }) {
                    guard qc.descAct else {
                        throw FormatsError.invalidTensorEntry(path: try ckpt.entry(m + ".g_idx").file.path, tensor: m + ".g_idx",
                                                              reason: "inputs out of group order, but desc_act is false")
                    }
                    gIdx = gi.map { Int32($0) }
                }
            } else if qc.descAct {
                throw FormatsError.missingTensor(name: m + ".g_idx", in: ckpt.directory + " (desc_act GPTQ)")
            }
            var zeros = transpose(BitPacking.unpackRows(qz.map { Int32(truncatingIfNeeded: $0) }, rows: gpr, cols: rows, bits: b), gpr, rows)
            if qc.gptqV1 {
                // v1 stores z - 1 (modulo 2^b): the stored maximum stands for 2^b, out of range.
                if let i = zeros.firstIndex(where: { Int($0) == maxCode }) {
                    throw FormatsError.invalidTensorEntry(path: try ckpt.entry(m + ".qzeros").file.path, tensor: m + ".qzeros",
                                                          reason: "zero point \(maxCode + 1) (v1 stores z - 1) at flat index \(i) is out of range for \(b) bits")
                }
                zeros = zeros.map { $0 + 1 }
            }
            let codes = BitPacking.unpackRowsTransposed(qw.map { Int32(truncatingIfNeeded: $0) }, rows: rows, cols: cols, bits: b)
            try checkRange(zeros, m + ".qzeros", max: maxCode)
            return QuantizedWeight(rows: rows, cols: cols, bits: b, group: g, symmetric: false, codes: codes,
                                   scales: transpose(s, gpr, rows), zeros: zeros, gIdx: gIdx)
        }
    }

    /// [r, c] -> [c, r], in 32 x 32 tiles.
    @inlinable
    static func transpose<E: BitwiseCopyable>(_ v: [E], _ r: Int, _ c: Int) -> [E] {
        precondition(v.count == r * c)
        guard let first = v.first else { return [] }
        var out = [E](repeating: first, count: v.count)
        v.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i0 in stride(from: 0, to: r, by: 32) {
                    for j0 in stride(from: 0, to: c, by: 32) {
                        for i in i0..<min(r, i0 + 32) {
                            for j in j0..<min(c, j0 + 32) { dst[j * r + i] = src[i * c + j] }
                        }
                    }
                }
            }
        }
        return out
    }
}

extension Checkpoint {
    /// A scale tensor as fp32 (exact from bf16/fp16), finite and positive.
    func scales(_ name: String, shape: [Int]) throws -> [Float] {
        let t = try tensor(name, shape: shape)
        if let i = t.data.firstIndex(where: { !($0 > 0) }) {
            throw FormatsError.invalidTensorEntry(path: try entry(name).file.path, tensor: name, reason: "scale \(t.data[i]) at flat index \(i) is not positive")
        }
        return t.data
    }

    /// An integer tensor's values, its dtype (when given) and shape checked.
    func integers(_ name: String, dtype: DType?, shape: [Int]) throws -> [Int64] {
        let (file, e) = try entry(name)
        if let dtype, e.dtype != dtype {
            throw FormatsError.dtypeMismatch(path: file.path, tensor: name, expected: dtype.rawValue, found: e.dtype.rawValue)
        }
        guard e.shape == shape else { throw FormatsError.shapeMismatch(path: file.path, tensor: name, expected: shape, found: e.shape) }
        return try file.intValues(name).values
    }
}
