/// A bounded cache of decoded L2 tables (and other per-cluster tables of
/// UInt64 entries), keyed by host offset. Write-through: callers update the
/// cached copy and write the change to disk themselves.
final class TableCache {
    private var tables: [UInt64: [UInt64]] = [:]
    private var cachedBytes = 0
    let budgetBytes: Int

    init(budgetBytes: Int) { self.budgetBytes = budgetBytes }

    subscript(offset: UInt64) -> [UInt64]? {
        get { tables[offset] }
        set {
            if let old = tables[offset] { cachedBytes -= old.count * 8 }
            if let newValue {
                if cachedBytes + newValue.count * 8 > budgetBytes && !tables.isEmpty {
                    // Simple and cheap: start over. Sequential work refills what it needs.
                    tables.removeAll(keepingCapacity: true)
                    cachedBytes = 0
                }
                tables[offset] = newValue
                cachedBytes += newValue.count * 8
            } else {
                tables[offset] = nil
            }
        }
    }

    func update(_ offset: UInt64, index: Int, value: UInt64) {
        tables[offset]?[index] = value
    }

    func removeAll() {
        tables.removeAll()
        cachedBytes = 0
    }
}

/// Decodes a table of big-endian u64 entries.
func decodeTable(_ bytes: [UInt8]) -> [UInt64] {
    let count = bytes.count / 8
    return [UInt64](unsafeUninitializedCapacity: count) { out, initialized in
        bytes.withUnsafeBytes { raw in
            for i in 0..<count { out[i] = BigEndian.load64(raw, i) }
        }
        initialized = count
    }
}

/// Encodes a table of u64 entries big-endian.
func encodeTable(_ entries: ArraySlice<UInt64>) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: entries.count * 8) { out, initialized in
        let raw = UnsafeMutableRawBufferPointer(out)
        for (i, v) in entries.enumerated() { BigEndian.store64(raw, i, v) }
        initialized = entries.count * 8
    }
}
