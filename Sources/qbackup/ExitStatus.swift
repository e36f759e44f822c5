import ArgumentParser
import Foundation
import QCowImage

/// Exit statuses and the one table that maps library errors to them.
enum ExitStatus {
    static let success: Int32 = 0
    static let failure: Int32 = 1
    static let usage: Int32 = 2

    /// Runs a command body; a library error becomes one `qbackup: error:` line on
    /// stderr and exit `errorStatus` (1, or 2 for compare, as qemu-img).
    static func run(errorStatus: Int32 = failure, _ body: () throws -> Int32) throws {
        let status: Int32
        do {
            status = try body()
        } catch let error as CodedError {
            report(error.description)
            throw ExitCode(errorStatus)
        } catch let error as ExitCode {
            throw error
        } catch let error as CocoaError {
            report(error.localizedDescription)
            throw ExitCode(errorStatus)
        } catch {
            report("\(error)")
            throw ExitCode(errorStatus)
        }
        if status != 0 { throw ExitCode(status) }
    }

    static func report(_ message: String) {
        let oneLine = message.replacingOccurrences(of: "\n", with: " ")
        FileHandle.standardError.write(Data("qbackup: error: \(oneLine)\n".utf8))
    }
}

/// Writes to stdout without buffering surprises.
func emit(_ text: String) {
    FileHandle.standardOutput.write(Data(text.utf8))
}
