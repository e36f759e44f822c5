import CLZ4

/// lz4 frames (liblz4's frame format) for the replication stream: each data record holds one
/// complete frame with its content size, so a frame decodes alone, into a buffer of known size.
/// Frames carry no content checksum: the record's CRC-32 covers the frame, and the chunk and
/// layer sha256 cover what it decodes to, so lz4's xxHash of every byte would only cost CPU on
/// both sides (frames from earlier versions that carry one still decode, and lz4 checks it).
enum LZ4Frames {
    private static func preferences(_ size: Int) -> LZ4F_preferences_t {
        var prefs = LZ4F_preferences_t()
        prefs.frameInfo.blockSizeID = LZ4F_max4MB
        prefs.frameInfo.blockMode = LZ4F_blockIndependent
        prefs.frameInfo.contentSize = UInt64(size)
        prefs.compressionLevel = 0
        return prefs
    }

    /// The most bytes a frame of `size` input bytes may take.
    static func bound(_ size: Int) -> Int {
        var prefs = preferences(size)
        return LZ4F_compressFrameBound(size, &prefs)
    }

    /// Compresses `input` into `output` (at least `bound(input.count)` bytes); nil when the
    /// frame would not be smaller than the input (the record then carries the bytes as they are).
    static func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        var prefs = preferences(input.count)
        let n = LZ4F_compressFrame(output.baseAddress, output.count, input.baseAddress, input.count, &prefs)
        guard LZ4F_isError(n) == 0, n < input.count else { return nil }
        return n
    }

    /// Decodes one frame that must hold exactly `output.count` bytes and nothing after it;
    /// false for anything else (a damaged frame, another size, trailing bytes).
    static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        var context: OpaquePointer?
        guard LZ4F_isError(LZ4F_createDecompressionContext(&context, UInt32(LZ4F_VERSION))) == 0, let context else { return false }
        defer { LZ4F_freeDecompressionContext(context) }
        var consumed = 0
        var produced = 0
        while true {
            var inSize = input.count - consumed
            var outSize = output.count - produced
            let hint = LZ4F_decompress(context, output.baseAddress.map { $0 + produced }, &outSize,
                                       input.baseAddress.map { $0 + consumed }, &inSize, nil)
            guard LZ4F_isError(hint) == 0 else { return false }
            consumed += inSize
            produced += outSize
            if hint == 0 { return consumed == input.count && produced == output.count }
            // No progress with input left: the frame wants more room than the record says it holds.
            if inSize == 0 && outSize == 0 { return false }
            if consumed == input.count { return false }
        }
    }
}
